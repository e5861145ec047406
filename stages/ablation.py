"""`make ablation`: the three fine-tuning regimes (frozen, svf, full) trained and scored alike.

Trains one model per regime (and per --train-seeds value) on the current params.yaml, scores them on
the same evaluation episodes, and writes results/ablation/fold<i>/: ablation.json (everything),
ablation.md (the table) and ablation.png (mIoU per regime; paired differences with 95% intervals).
Needs the pipeline's data (and, for BAM, its base learner): `make ablation` runs `dvc repro` first.
Not a DVC stage: it trains three models where `dvc repro` trains one.
"""
from __future__ import annotations

from pathlib import Path

from pipeline import tracking
from pipeline.ablation import REGIMES, run_ablation, table
from pipeline.figures import ablation_figure
from stages.common import run, setup, write_json


def main():
    args, cfg = setup(__doc__, extra=lambda ap: (
        ap.add_argument("--fold", type=int, default=None, help="fold (default: the first of split.folds)"),
        ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES, help="regimes to train"),
        ap.add_argument("--train-seeds", nargs="+", type=int, default=None,
                        help="training seeds, one model per regime and seed (default: train.seed)"),
        ap.add_argument("--out", default="results/ablation", help="output folder (default: results/ablation)")))
    fold = cfg.split.folds[0] if args.fold is None else args.fold
    if fold not in (0, 1, 2, 3):
        raise ValueError(f"unknown fold {fold}; choose one of [0, 1, 2, 3]")
    out = Path(args.out) / f"fold{fold}"
    base = Path("models") / f"fold{fold}" / "base" / "base.pt" if cfg.model.head == "bam" else None
    result = run_ablation(cfg, fold, Path("checkpoints") / "ablation" / f"fold{fold}", args.regimes,
                          args.train_seeds, base_file=base)
    path = write_json(out / "ablation.json", result)
    md = out / "ablation.md"
    md.write_text(table(result))
    fig = ablation_figure(result, out / "ablation.png")
    metrics = {f"{regime}_{k}_miou": v["miou"] for regime, r in result["regimes"].items()
               for k, v in r.items() if isinstance(v, dict)}
    metrics.update({f"{pair.replace(' - ', '_minus_')}_{k}": d["mean"] for k, ds in result["differences"].items()
                    for pair, d in ds.items()})
    tracking.log_summary_run(cfg, f"fold{fold}-ablation-{cfg.model.head}",
                             {"fold": fold, "regimes": args.regimes, "train_seeds": result["train_seeds"],
                              "eval_seeds": cfg.eval.seeds, "episodes": cfg.eval.episodes},
                             metrics, [path, md, fig], {"role": "ablation"})
    print(table(result))
    print(f"ablation fold {fold}: {path}, {md}, {fig}")


if __name__ == "__main__":
    run(main)
