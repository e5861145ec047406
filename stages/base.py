"""DVC stage `base`: BAM's base learner of one fold (PSPNet on the base classes), before `train`.

With model.head other than bam there is nothing to train: the stage writes only base.json saying
so, and `train` does not wait on a learner it does not use.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from stages.common import run, setup, under_torchrun, write_json


def adopt(cfg, fold: int, out: Path) -> None:
    """train.released: the base learner stored in the fold's published BAM file, as base.pt."""
    from pipeline import adapter as adapter_io
    from pipeline import released
    from pipeline.data.benchmarks import fold_classes
    net, source = released.base_learner_of(cfg, fold)
    for stale in ("mlflow_run.json", "curves.png", "train.csv", "val.csv"):
        (out / stale).unlink(missing_ok=True)
    adapter_io.save(adapter_io.base_state(net, cfg, fold, fold_classes(cfg, fold)[1], {"released": source}),
                    out / "base.pt")
    write_json(out / "base.json", {"fold": fold, "trained": False, "released": source,
                                   "reason": "train.released: the published file's base learner"})
    print(f"base fold {fold}: adopted the base learner of {source['file']} (sha256 {source['sha256'][:12]}) -> "
          f"{out / 'base.pt'}, not trained")


def main():
    args, cfg = setup(__doc__, fold=True)
    out = plots = Path("models") / f"fold{args.fold}" / "base"   # one DVC output: learner, record, curves
    out.mkdir(parents=True, exist_ok=True)
    (out / "base.pt").unlink(missing_ok=True)
    if cfg.model.head != "bam":
        for stale in ("mlflow_run.json", "curves.png", "train.csv", "val.csv"):
            (out / stale).unlink(missing_ok=True)
        write_json(out / "base.json", {"fold": args.fold, "trained": False,
                                       "reason": f"model.head is {cfg.model.head}: only bam uses a base learner"})
        print(f"base fold {args.fold}: nothing to train (model.head is {cfg.model.head})")
        return
    from pipeline import tracking          # here: a head without a base learner needs neither torch nor MLflow
    if cfg.train.released:
        return adopt(cfg, args.fold, out)
    if under_torchrun(cfg.base, "base", "stages.base"):
        return
    from pipeline.train_base import checkpoint_path, train_base
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        rf = tracking.run_file(out)
        if not (checkpoint_path(cfg, args.fold).exists() and rf.exists()):
            tracking.start_run(cfg, args.fold, 0, out, role="base")
    with tracking.open_run(cfg, out, "base", enabled=rank == 0) as tracker:
        summary = train_base(cfg, args.fold, out, plots, tracker.metrics if tracker else None)
        if tracker is None:
            return
        write_json(out / "base.json", {"trained": True, **summary})
        tracker.tags({"base.device": summary["device_name"]})
        tracker.metrics({"base_miou": summary["base_miou"], "base_seconds": summary["seconds"]})
        for f in (out / "base.json", plots / "train.csv", plots / "val.csv", plots / "curves.png"):
            tracker.artifact(f, "base")
        run_id = json.loads(tracking.run_file(out).read_text())["run_id"]
        print(f"base fold {args.fold}: PSPNet base learner {out / 'base.pt'} ({summary['params']:,} parameters, "
              f"{summary['classes']} classes), best base-class mIoU {summary['base_miou']:.2f} at iteration "
              f"{summary['best_iteration']}, curves in {plots}, MLflow run {run_id}")


if __name__ == "__main__":
    run(main)
