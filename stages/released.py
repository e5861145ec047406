"""`python -m stages.released CHECKPOINT --format pfenet|bam|svf --preset NAME --fold I --shot K --out DIR [--size S]`:
a model the PFENet or BAM authors publish (or the SVF authors' code trains), as a model folder every serving path
takes.

Reads the file as their train.py saves it (pipeline/released.py maps its keys), builds the preset's model
with what the format's code fixes (dilation, PFENet's bins), loads it strictly, and writes DIR: merged.pt,
model.onnx and the split graphs (each checked against the PyTorch model through ONNX Runtime on random
episodes, as the export stage checks), released.json (the file's sha256, the format, preset, fold, shots,
size, parity). No dataset is needed. `python -m serving --model-dir DIR`, `serving.predict`, the Label Studio
backend, the page and `svf_fss_predict` (after `make cpp`'s AOTInductor step) then serve it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from pipeline import adapter as adapter_io
from pipeline import released
from pipeline.config import ConfigError, load_config
from pipeline.data.benchmarks import fold_classes
from pipeline.data.episodes import MEAN, STD

log = logging.getLogger("released")


def preset_config(preset: str, fmt: str, fold: int):
    """The preset's config; refused when its head is not one the format's code trains."""
    from stages.preset import PRESETS, render
    import yaml
    render(preset)                                       # names an unknown preset, with the closest
    cfg = load_config(yaml.safe_load((PRESETS / f"{preset}.yaml").read_text()))
    heads = released.FORMATS[fmt]["heads"]
    if cfg.model.head not in heads:
        raise ConfigError(f"preset {preset} is a {cfg.model.head} model and --format {fmt} trains {' or '.join(heads)}: "
                          f"choose such a preset (e.g. {cfg.data.benchmark}_{heads[0]}_frozen)")
    if fold not in range(4):
        raise ConfigError(f"--fold {fold}: the benchmark has folds 0 to 3")
    return cfg


def random_episodes(size: int, shots: list[int], n: int = 2) -> list[tuple]:
    """Episodes for the parity check (no dataset needed): normalised noise images, masks with an object."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        k = shots[i % len(shots)]
        q = torch.randn(1, 3, size, size, generator=g)
        s = torch.randn(1, k, 3, size, size, generator=g)
        m = (torch.rand(1, k, size, size, generator=g) > 0.6).float()
        out.append((q, s, m))
    return out


def adopt_base(checkpoint: str, preset: str, fold: int, out: Path) -> dict:
    """BAM's released base learner (``best.pth``) as the base stage's ``base.pt`` for ``fold``."""
    cfg = preset_config(preset, "bam", fold)
    released.configure(cfg, "bam")
    state, digest = released.read(checkpoint)
    mine = released.base_learner_state(state)
    base_classes = fold_classes(cfg, fold)[1]
    from pipeline.models import base_learner
    net = base_learner(cfg.model, len(base_classes) + 1)
    want = net.state_dict()
    wrong = sorted(set(mine) ^ set(want)) or [k for k in want if tuple(want[k].shape) != tuple(mine[k].shape)]
    if wrong:
        found = released.describe({"layer1.0.conv1.weight": 0} if "backbone.layer1.0.conv1.weight" in mine else {},
                                   "bam")
        classes = mine["cls.4.weight"].shape[0] if "cls.4.weight" in mine else "?"
        raise ValueError(f"{checkpoint} does not fit preset {preset}'s base learner ({len(base_classes) + 1} classes, "
                         f"{cfg.model.backbone}): the file has {classes} classes and a {found['backbone']} backbone; "
                         f"first difference {wrong[0]}")
    net.load_state_dict(mine, strict=True)
    source = {"file": str(checkpoint), "sha256": digest, "format": "bam", "preset": preset, "fold": fold}
    adapter_io.save(adapter_io.base_state(net, cfg, fold, base_classes, {"released": source}), out)
    return source


def adopt(checkpoint: str, fmt: str, preset: str, fold: int, shot: int, out: Path, size: int | None) -> dict:
    from export import onnx_export
    t0 = time.perf_counter()
    cfg = released.released_params(preset_config(preset, fmt, fold), str(checkpoint), fmt)
    model, source = released.build(cfg, fmt, checkpoint, fold, shot, preset)
    digest = source["sha256"]
    out.mkdir(parents=True, exist_ok=True)
    size = size or cfg.eval.test_size
    source["preset"] = preset
    adapter_io.save({**adapter_io.merged_state(model, cfg), "released": source}, out / "merged.pt")
    meta = {"format": "svf-fss/1", "head": cfg.model.head, "backbone": cfg.model.backbone, "finetune": "released",
            "benchmark": cfg.data.benchmark, "fold": fold, "model_shots": shot, "released_sha256": digest,
            "novel_classes": fold_classes(cfg, fold)[0], "input_size": [size, size],
            "normalisation": {"mean": list(MEAN), "std": list(STD), "scale": 1 / 255}}
    shots = [shot] if cfg.model.head == "bam" else cfg.export.shots
    graphs = onnx_export.export_checked(model, out, size, cfg.export.opset, meta, cfg.export.exporter,
                                        random_episodes(size, shots), cfg.export.rtol)
    report = {**source, "size": size, "exporter": graphs["exporter"], "parity": graphs["parity"],
              "split_parity": graphs["split_parity"], "openvino_parity": graphs.get("openvino_parity"), "seconds": round(time.perf_counter() - t0, 1)}
    (out / "released.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m stages.released", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="the authors' file (train_epoch_*.pth, final.pth, ...)")
    ap.add_argument("--format", required=True, choices=sorted(released.FORMATS), help="which code trained it: pfenet "
                    "(dvlab-research/PFENet), bam (chunbolang/BAM), svf (zechao-li/SVF-few-shot-segmentation)")
    ap.add_argument("--preset", required=True, help="the setting it was trained in (presets/<name>.yaml), e.g. "
                    "pascal_pfenet_frozen")
    ap.add_argument("--fold", type=int, required=True)
    ap.add_argument("--shot", type=int, default=1, help="the shots it was trained with (BAM: its k-shot reweighting)")
    ap.add_argument("--out", required=True, help="the model folder to write")
    ap.add_argument("--size", type=int, default=None, help="the export size (default: the preset's test size)")
    ap.add_argument("--base", action="store_true", help="the file is BAM's base learner (best.pth): write --out as "
                    "the base stage's base.pt (models/fold<i>/base/base.pt) for BAM training to start from")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript"):          # a line per rewritten node of the dynamo export
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.base:
            if args.format != "bam":
                raise ValueError("--base reads BAM's base learner: give --format bam")
            r = adopt_base(args.checkpoint, args.preset, args.fold, Path(args.out))
            print(f"released BAM base learner {args.checkpoint} (sha256 {r['sha256'][:12]}) -> {args.out}: preset "
                  f"{args.preset}, fold {args.fold}")
            return
        r = adopt(args.checkpoint, args.format, args.preset, args.fold, args.shot, Path(args.out), args.size)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"released {args.format} model {args.checkpoint} (sha256 {r['sha256'][:12]}) -> {args.out}: preset "
          f"{args.preset}, fold {args.fold}, {args.shot}-shot, {r['size']} px; ONNX parity max rel "
          f"{r['parity']['max_rel']:.2e}, split {r['split_parity']['max_rel']:.2e}; {r['seconds']} s")


if __name__ == "__main__":
    main()
