"""DVC stage `report`: the one metrics file per fold that `dvc metrics show` and `dvc exp show` compare.

It gathers what users compare from the reports of the fold's models (``models/fold<i>/<k>shot/``
evaluate.json, merge.json, export.json): per shot count mIoU, its spread over seeds and FB-IoU,
keyed ``5shot`` when the 5-shot model scored it and ``5shot_by1`` when the 1-shot model did; and
BAM's base learner's base-class mIoU (``base_miou``); the deployed models' parity with the trained ones as the number of matching digits (-log10 of the
worst relative error of merge and ONNX export), which survives DVC's rounding to 5 decimals where
1.6e-07 shows as 0.0. It draws the per-class IoU chart and completes the registry entries.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline import tracking
from pipeline.figures import per_class_figure
from stages.common import model_dir, run, setup, write_json


def digits(rel: float) -> float:
    """-log10 of a relative error, rounded to 2 decimals (7.0 = agrees to 1e-7); 16 for an exact 0."""
    return round(-math.log10(rel), 2) if rel > 0 else 16.0


def read_models(fold: int, shots: list[int]) -> dict[int, dict]:
    """{training shots: {"evaluate": ..., "merge": ..., "export": ...}} of the fold's models."""
    out = {}
    for k in shots:
        d = model_dir(fold, k)
        missing = [f for f in ("evaluate.json", "merge.json", "export.json") if not (d / f).exists()]
        if missing:
            raise FileNotFoundError(f"{d} lacks {', '.join(missing)}; run `dvc repro report@{fold}`")
        out[k] = {f.split(".")[0]: json.loads((d / f).read_text()) for f in ("evaluate.json", "merge.json",
                                                                             "export.json")}
    return out


def summary(models: dict[int, dict]) -> dict:
    out, worst = {}, 0.0
    for reports in models.values():
        for key, s in reports["evaluate"].items():
            if "shot" in key and isinstance(s, dict):
                out[key] = {"miou": round(s["miou"], 2), "std": round(s["miou_std"], 2), "fbiou": round(s["fbiou"], 2)}
        worst = max(worst, reports["merge"]["max_rel"], reports["export"]["onnx"]["parity"]["max_rel"])
    out = dict(sorted(out.items(), key=lambda kv: int(kv[0].split("shot")[0])))
    out["parity"] = digits(worst)
    return out


def main():
    args, cfg = setup(__doc__, fold=True)
    models = read_models(args.fold, cfg.train.shots)
    metrics = summary(models)
    base = Path("models") / f"fold{args.fold}" / "base" / "base.json"
    if base.exists() and json.loads(base.read_text()).get("trained"):   # BAM: the base learner's base-class mIoU
        metrics["base_miou"] = round(json.loads(base.read_text())["base_miou"], 2)
    if cfg.eval.paper:         # a preset of the paper: measured vs published, per shot count of this fold
        from pipeline.paper import compare, published
        metrics["paper"] = compare(cfg.eval.paper, args.fold, metrics)
        for key, c in metrics["paper"].items():
            print(f"report fold {args.fold}: {key} mIoU {c['measured']:.2f}, the paper {c['paper']:.2f} "
                  f"({published(cfg.eval.paper)['source']}): {c['difference']:+.2f}")
    if cfg.train.released:     # a published model: its own paper's 4-fold mean beside this fold's measure
        from pipeline.paper import released_paper
        ref = released_paper(cfg)
        if ref:
            metrics["released_paper"] = {k: {"measured": metrics[k]["miou"], "paper_mean": ref[k]}
                                         for k in ("1shot", "5shot") if k in metrics}
            for key, c in metrics["released_paper"].items():
                print(f"report fold {args.fold}: {key} mIoU {c['measured']:.2f} of the published model; its paper "
                      f"{c['paper_mean']:.2f} ({ref['source']})")
    path = write_json(Path("metrics") / f"fold{args.fold}.json", metrics)
    evaluations = {k: v for r in models.values() for k, v in r["evaluate"].items() if "shot" in k and isinstance(v, dict)}
    regime = models[cfg.train.shots[0]]["evaluate"]["finetune"]
    fig = per_class_figure(evaluations, Path("plots") / f"fold{args.fold}" / "per_class_iou.png",
                           f"fold {args.fold}, {regime}: IoU per novel class (mean and range over seeds)")
    for k, reports in models.items():
        with tracking.resume_run(cfg, model_dir(args.fold, k), "report") as t:
            t.artifact(path, "report")
            t.artifact(fig, "report")
            version = reports["export"].get("mlflow", {}).get("version")
            if version is not None:
                mine = {key: v for key, v in metrics.items() if isinstance(v, dict) and key in reports["evaluate"]}
                tracking.describe_model_version(cfg, version, {f"{key}_miou": v["miou"] for key, v in mine.items()}
                                                | {"parity_digits": metrics["parity"]})
    shots = "; ".join(f"{k} mIoU {v['miou']:.2f} +- {v['std']:.2f}" for k, v in metrics.items()
                      if isinstance(v, dict) and "miou" in v)
    print(f"report fold {args.fold}: {shots}; parity {metrics['parity']:.1f} digits -> {path}, {fig}")


if __name__ == "__main__":
    run(main)
