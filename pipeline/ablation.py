"""The three-regime ablation: ``frozen``, ``svf`` and ``full`` trained alike and scored on the same episodes.

Every regime starts from the same weights (model.init_seed), sees the same training episodes in the
same order (train.seed) and is scored on identical evaluation episodes (eval.seeds x eval.episodes:
the same queries and supports for every regime). Reported per regime: the mIoU as the pipeline
reports it (mean over evaluation seeds, with their spread, and the spread over training seeds when
several are given). Reported per pair, svf - frozen and svf - full: the mean over seeds of the
per-seed mIoU difference, with a 95% interval from a paired bootstrap over episodes (each seed's
episodes resampled with replacement, the same resample for both regimes, the class-pooled mIoU
recomputed on it). The interval covers which episodes were drawn; training noise shows in the spread
over training seeds (``--train-seeds``), which the interval does not contain.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import adapter as adapter_io
from .config import load_config
from .data.benchmarks import fold_classes, prepared_dir, split_dir
from .data.episodes import EpisodeDataset
from .evaluate import evaluate, shot_key
from .loop import pick_device
from .models import accepts_shots
from .train import train

REGIMES = ("frozen", "svf", "full")
PAIRS = (("svf", "frozen"), ("svf", "full"))


def pooled_miou(records: np.ndarray, classes: list[int], rows: np.ndarray | None = None) -> np.ndarray:
    """Class-pooled mIoU (sum I / sum U per class, mean over classes drawn) of episode ``records``
    [N, 3] = (class, I, U), for each row of episode indices ``rows`` [B, N] (default: all, once)."""
    rows = np.arange(len(records))[None] if rows is None else rows
    cls, inter, union = (records[rows, j] for j in range(3))                # [B, N] each
    onehot = cls[..., None] == np.asarray(classes)                          # [B, N, C]
    i_sum = (onehot * inter[..., None]).sum(1)
    u_sum = (onehot * union[..., None]).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nanmean(np.where(u_sum > 0, i_sum / u_sum, np.nan), axis=1)


def paired_difference(a: list[np.ndarray], b: list[np.ndarray], classes: list[int], draws: int = 2000,
                      seed: int = 0) -> dict:
    """Mean over seeds of mIoU(a) - mIoU(b) (in %) with its 95% paired-bootstrap interval.
    ``a``, ``b``: per evaluation seed, the [N, 3] records of the same N episodes under two models."""
    rng = np.random.default_rng(seed)
    point, boot = [], []
    for ra, rb in zip(a, b):
        if len(ra) != len(rb) or not np.array_equal(ra[:, 0], rb[:, 0]):
            raise ValueError("paired difference of two evaluations that did not score the same episodes")
        point.append(pooled_miou(ra, classes)[0] - pooled_miou(rb, classes)[0])
        rows = rng.integers(0, len(ra), size=(draws, len(ra)))
        boot.append(pooled_miou(ra, classes, rows) - pooled_miou(rb, classes, rows))
    boot = 100 * np.mean(boot, axis=0)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"mean": round(100 * float(np.mean(point)), 2), "ci95": [round(float(lo), 2), round(float(hi), 2)]}


def regime_config(cfg, regime: str, train_seed: int):
    d = cfg.to_dict()
    d["model"]["finetune"], d["train"]["seed"] = regime, train_seed
    return load_config(d)


def score(model, cfg, fold: int, shots: int, device, progress: bool = True) -> list[np.ndarray]:
    """Per evaluation seed, the [N, 3] episode records of ``model`` on ``shots``-shot episodes."""
    prepared = prepared_dir(cfg.data.root, cfg.data.benchmark)
    pairs = split_dir(cfg.data.root, cfg.data.benchmark, fold) / "val.jsonl"
    novel = fold_classes(cfg, fold)[0]
    out = []
    for seed in cfg.eval.seeds:
        ds = EpisodeDataset(prepared, pairs, shots, "test", cfg.eval.test_size, seed=seed, episodes=cfg.eval.episodes,
                            protocol=cfg.eval.protocol)
        acc, _ = evaluate(model, ds, device, desc=f"{cfg.model.finetune} {shots}-shot seed {seed}", classes=novel,
                          progress=progress, workers=cfg.train.workers)
        out.append(np.asarray(acc.records, dtype=np.int64))
    return out


def run_ablation(cfg, fold: int, out_dir: str | Path, regimes=REGIMES, train_seeds=None, base_file=None,
                 progress: bool = True) -> dict:
    """Train and score every regime (x training seed); returns the result (``table`` and
    figures.ablation_figure render it)."""
    out_dir = Path(out_dir)
    train_seeds = list(train_seeds or [cfg.train.seed])
    model_shots = cfg.train.shots[0]
    novel = fold_classes(cfg, fold)[0]
    device = pick_device(cfg.eval.device)
    records: dict = {}          # regime -> shots -> [per train seed: [per eval seed: records]]
    result = {"fold": fold, "benchmark": cfg.data.benchmark, "head": cfg.model.head, "backbone": cfg.model.backbone,
              "model_shots": model_shots, "train_seeds": train_seeds, "eval_seeds": cfg.eval.seeds,
              "episodes_per_seed": cfg.eval.episodes, "regimes": {}, "differences": {}}
    for regime in regimes:
        entry = result["regimes"].setdefault(regime, {"train_seconds": [], "trainable_backbone_params": None})
        for ts in train_seeds:
            rc = regime_config(cfg, regime, ts)
            run_dir = out_dir / f"{regime}-seed{ts}"
            t0 = time.time()
            summary = train(rc, fold, model_shots, run_dir, run_dir,
                            checkpoint=Path("checkpoints") / "ablation" / f"fold{fold}" / f"{regime}-seed{ts}.pt",
                            base_file=base_file)
            entry["train_seconds"].append(round(time.time() - t0, 1))
            entry["trainable_backbone_params"] = summary["trainable_backbone_params"]
            model, _ = adapter_io.load_model(run_dir / "adapter.pt", rc, base=base_file)
            model.to(device)
            for k in cfg.eval.shots:
                if accepts_shots(model, k):
                    records.setdefault(regime, {}).setdefault(k, []).append(score(model, rc, fold, k, device, progress))
    for regime, by_shots in records.items():
        for k, runs in by_shots.items():
            per_run = [[100 * pooled_miou(r, novel)[0] for r in seeds] for seeds in runs]   # [train seed][eval seed]
            means = [float(np.mean(v)) for v in per_run]
            result["regimes"][regime][shot_key(k, model_shots)] = {
                "miou": round(float(np.mean(means)), 2),
                "std_eval_seeds": round(float(np.mean([np.std(v) for v in per_run])), 2),
                "std_train_seeds": round(float(np.std(means)), 2) if len(means) > 1 else None,
                "per_train_seed": [round(m, 2) for m in means],
                "per_eval_seed": [[round(x, 2) for x in v] for v in per_run]}
    for a, b in PAIRS:
        if a not in records or b not in records:
            continue
        for k in records[a]:
            if k in records[b]:
                flat_a = [r for seeds in records[a][k] for r in seeds]
                flat_b = [r for seeds in records[b][k] for r in seeds]
                result["differences"].setdefault(shot_key(k, model_shots), {})[f"{a} - {b}"] = \
                    paired_difference(flat_a, flat_b, novel)
    return result


def table(result: dict) -> str:
    """The result as a Markdown table: mIoU per regime and shot count, then the paired differences."""
    keys = sorted({k for r in result["regimes"].values() for k, v in r.items() if isinstance(v, dict)})
    many = len(result["train_seeds"]) > 1
    lines = [f"Fold {result['fold']}, {result['head']} on {result['backbone']}, {result['model_shots']}-shot models, "
             f"{len(result['eval_seeds'])} evaluation seeds x {result['episodes_per_seed']} episodes"
             + (f", training seeds {result['train_seeds']}" if many else "")
             + "; mIoU as mean ± std over the evaluation seeds.", "",
             "| regime | trainable backbone params | train s | " + " | ".join(f"{k} mIoU" for k in keys) + " |",
             "|---|---:|---:|" + "---:|" * len(keys)]
    for name, r in result["regimes"].items():
        cells = []
        for k in keys:
            s = r.get(k)
            cells.append("-" if s is None else f"{s['miou']:.2f} ± {s['std_eval_seeds']:.2f}"
                         + (f" (train seeds ± {s['std_train_seeds']:.2f})" if s["std_train_seeds"] is not None else ""))
        lines.append(f"| {name} | {r['trainable_backbone_params']:,} | {np.mean(r['train_seconds']):.0f} | "
                     + " | ".join(cells) + " |")
    if result["differences"]:
        lines += ["", "| paired difference | " + " | ".join(result["differences"]) + " |",
                  "|---|" + "---:|" * len(result["differences"])]
        pairs = sorted({p for d in result["differences"].values() for p in d})
        for p in pairs:
            cells = [f"{d[p]['mean']:+.2f} [{d[p]['ci95'][0]:+.2f}, {d[p]['ci95'][1]:+.2f}]" if p in d else "-"
                     for d in result["differences"].values()]
            lines.append(f"| {p} (95% CI) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
