"""DVC stage `train`: episodic base-class training of one fold (also under torchrun for DDP).

With train.released set, the fold's published model is adopted instead (pipeline/released.py): the same
outputs, written in seconds, and the stages after it run unchanged."""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline import tracking
from pipeline.data.benchmarks import require, split_dir
from stages.common import model_dir, plots_dir, run, setup, under_torchrun, write_json


def adopt(cfg, fold: int, shot: int, out: Path, plots: Path) -> None:
    """train.released: the published file as this fold's adapter, its sha256 the MLflow run's source."""
    from pipeline import adapter as adapter_io
    from pipeline import released
    from pipeline.figures import curves_figure
    from pipeline.loop import write_csv
    base = adapter_io.read_base(adapter_io.base_path(out / "adapter.pt"), cfg, fold) if cfg.model.head == "bam" else None
    state, source = released.adapter_of(cfg, fold, shot, base)
    run_id = tracking.start_run(cfg, fold, shot, out)
    with tracking.open_run(cfg, out, "train") as tracker:
        adapter_io.save(state, out / "adapter.pt")
        write_json(out / "train.json", {"fold": fold, "shots": shot, "iterations": 0, "released": source,
                                        "adapter_file_bytes": (out / "adapter.pt").stat().st_size})
        write_csv(plots / "train.csv", [{"iteration": 0, "loss": float("nan")}])
        write_csv(plots / "val.csv", [{"iteration": 0, "val_miou": float("nan")}])
        curves_figure([], [], plots / "curves.png", f"fold {fold}, {shot}-shot: not trained here, adopted from "
                      f"{source['file']} ({source['format']}, sha256 {source['sha256'][:12]})")
        tracker.tags({"source": "released", "released.file": source["file"], "released.sha256": source["sha256"],
                      "released.format": source["format"], "mlflow.source.name": source["file"]})
        for f in (out / "adapter.pt", out / "train.json", plots / "curves.png"):
            tracker.artifact(f, "train")
    print(f"train fold {fold}, {shot}-shot: adopted {source['file']} ({source['format']}, sha256 "
          f"{source['sha256'][:12]}) as {out / 'adapter.pt'}, not trained; MLflow run {run_id}")


def main():
    args, cfg = setup(__doc__, fold=True)
    if cfg.train.released:
        return adopt(cfg, args.fold, args.shot, model_dir(args.fold, args.shot), plots_dir(args.fold, args.shot))
    if under_torchrun(cfg.train, "train", "stages.train"):
        return
    for f in ("train.jsonl", "val.jsonl"):     # before torch is imported: a missing input fails at once
        require(split_dir(cfg.data.root, cfg.data.benchmark, args.fold) / f, "split file", "split")
    from pipeline import adapter as adapter_io
    from pipeline.train import train
    rank = int(os.environ.get("RANK", "0"))
    out, plots = model_dir(args.fold, args.shot), plots_dir(args.fold, args.shot)
    run_id = None
    if cfg.model.head == "bam":   # a missing or unfit base learner stops here, before an MLflow run is opened
        adapter_io.read_base(adapter_io.base_path(out / "adapter.pt"), cfg, args.fold)
    if rank == 0:
        from pipeline.train import checkpoint_path
        rf = tracking.run_file(out)
        if checkpoint_path(cfg, args.fold, args.shot).exists() and rf.exists():
            run_id = json.loads(rf.read_text())["run_id"]     # a resumed execution keeps its run
        else:
            run_id = tracking.start_run(cfg, args.fold, args.shot, out)
    with tracking.open_run(cfg, out, "train", enabled=rank == 0) as tracker:
        summary = train(cfg, args.fold, args.shot, out, plots, tracker.metrics if tracker else None)
        if tracker is None:
            return
        write_json(out / "train.json", summary)
        tracker.tags({"device": summary["device_name"], "world_size": summary["world_size"]})
        tracker.metrics({"adapter_bytes": summary["adapter_bytes"], "best_val_miou": summary["best_val_miou"],
                         "train_seconds": summary["seconds"], "episodes_per_second": summary["episodes_per_second"]})
        for f in (out / "adapter.pt", out / "train.json", plots / "train.csv", plots / "val.csv", plots / "curves.png"):
            tracker.artifact(f, "train")
        print(f"train fold {args.fold}, {args.shot}-shot: adapter {out / 'adapter.pt'} ({summary['adapter_file_bytes'] / 1e6:.2f} MB; "
              f"dense model parameters {summary['full_model_param_bytes'] / 1e6:.1f} MB), best val mIoU "
              f"{summary['best_val_miou']:.2f} at iteration {summary['best_iteration']}, curves in {plots}, "
              f"MLflow run {run_id}")

if __name__ == "__main__":
    run(main)
