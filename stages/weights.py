"""DVC stage `weights`: torchvision's ImageNet checkpoints (sha256-verified) where `train` and `base` look,
when model.pretrained is imagenet. Its output is `persist`: a verified checkpoint is never fetched twice."""
from __future__ import annotations

from pathlib import Path

from pipeline.data.imagenet import fetch_weights
from stages.common import run, setup, write_json


def main():
    _, cfg = setup(__doc__)
    d = cfg.data
    wdir = Path(d.root) / "weights" / "imagenet"
    wdir.mkdir(parents=True, exist_ok=True)
    if cfg.model.pretrained == "imagenet":
        weights = fetch_weights(sorted(set(d.backbones) | {cfg.model.backbone}), d.root, d.mirror)
    else:
        weights = {"note": f"model.pretrained is {cfg.model.pretrained!r}: no ImageNet weights needed"}
    write_json(wdir / "weights.json", weights)
    print(f"weights: ImageNet weights in {wdir}")


if __name__ == "__main__":
    run(main)
