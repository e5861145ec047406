"""Parameter counts of the few-shot models per head and fine-tune regime (no weights needed).

    python benchmarks/param_counts.py [--backbone resnet50_deep] [--base-classes 16 61]

Prints, for PFENet and BAM: the backbone, the head, BAM's base learner (per base class count), the
trainable parameters of each regime, and the deployed (merged) model's total.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.svf import merge_svf  # noqa: E402


def count(head: str, backbone: str, regime: str, shots: int, classes: int) -> dict:
    cfg = load_config({"model": {"head": head, "backbone": backbone, "pretrained": "random", "finetune": regime}})
    model, c = build_model(cfg, base={"classes": classes} if head == "bam" else None, shots=shots)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    deployed = sum(p.numel() for p in merge_svf(model).parameters())   # dense; a shared backbone counts once
    return {**c, "trainable_all": trainable, "deployed": deployed}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet50_deep")
    ap.add_argument("--base-classes", type=int, nargs="+", default=[16, 61], help="1 + base classes (PASCAL 16, COCO 61)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)   # the random-backbone warning: no weights are needed to count
    print(f"{'model':<28}{'regime':<8}{'backbone':>12}{'head':>12}{'base learner':>14}{'trainable':>12}{'deployed':>12}")
    rows = [("pfenet", 1, args.base_classes[0])] + [("bam", k, n) for n in args.base_classes for k in (1, 5)]
    for head, shots, classes in rows:
        for regime in ("frozen", "svf", "full"):
            c = count(head, args.backbone, regime, shots, classes)
            name = "PFENet" if head == "pfenet" else f"BAM {shots}-shot, {classes} base outputs"
            print(f"{name:<28}{regime:<8}{c['total']:>12,}{c['head']:>12,}{c.get('base', 0):>14,}"
                  f"{c['trainable_all']:>12,}{c['deployed']:>12,}")


if __name__ == "__main__":
    main()
