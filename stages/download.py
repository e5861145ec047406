"""DVC stage `download`: fetch and verify the benchmark (or generate the synthetic one) and the ImageNet
backbone weights (when model.pretrained is imagenet)."""
from __future__ import annotations

from pathlib import Path

from pipeline.data.benchmarks import raw_dir
from pipeline.data.sources import fetch_benchmark, fetch_weights
from stages.common import run, setup, write_json


def main():
    _, cfg = setup(__doc__)
    d = cfg.data
    fetch_benchmark(d.benchmark, d.root, d.mirror, d.synthetic, d.workers, folder=d.folder)
    wdir = Path(d.root) / "weights" / "imagenet"
    wdir.mkdir(parents=True, exist_ok=True)
    if cfg.model.pretrained == "imagenet":
        weights = fetch_weights(sorted(set(d.backbones) | {cfg.model.backbone}), d.root, d.mirror)
    else:
        weights = {"note": f"model.pretrained is {cfg.model.pretrained!r}: no ImageNet weights needed"}
    write_json(wdir / "weights.json", weights)
    print(f"download: raw data in {raw_dir(d.root, d.benchmark)}, ImageNet weights in {wdir}")


if __name__ == "__main__":
    run(main)
