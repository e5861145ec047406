"""DVC stage `pretrain`: the offline backbone for model.pretrained: synthetic (pipeline/pretrain.py).

Any other model.pretrained leaves only a note: its weights come from `download` or a file."""
from __future__ import annotations

from pathlib import Path

from stages.common import run, setup, write_json


def main():
    _, cfg = setup(__doc__)
    d, s, arch = cfg.data, cfg.data.synthetic, cfg.model.backbone
    wdir = Path(d.root) / "weights" / "synthetic"
    wdir.mkdir(parents=True, exist_ok=True)
    if cfg.model.pretrained == "synthetic":
        from pipeline.models.backbone import weights_path    # torch: only when there is something to pretrain
        from pipeline.pretrain import pretrain
        info = pretrain(arch, weights_path(d.root, arch, "synthetic"), s.pretrain_iterations, s.pretrain_batch,
                        s.pretrain_size, s.seed)
        print(f"pretrain: {arch} pretrained on the generated shape-family set -> {info['file']} (final loss {info['final_loss']:.3f})")
    else:
        info = {"note": f"model.pretrained is {cfg.model.pretrained!r}: nothing to pretrain"}
        print(f"pretrain: {info['note']}")
    write_json(wdir / "pretrain.json", info)


if __name__ == "__main__":
    run(main)
