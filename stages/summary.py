"""DVC stage `summary`: the mean over the folds run, beside the paper's mean, as every published number is.

Reads `metrics/fold<i>.json` of split.folds (written by `report`), writes `results/folds.json` and
`results/folds.md` (`cat results/folds.md`), and prints the table: per shot count the
mIoU of each fold, their mean, and with eval.paper the paper's folds and mean (and a published model's own
paper, train.released). A mean over fewer than the 4 folds is labelled as such: it is not the paper's number.
"""
from __future__ import annotations

import json
from pathlib import Path

from stages.common import run, setup, write_json

OUT = Path("results")


def summarise(cfg, metrics: dict[int, dict]) -> dict:
    """{"folds", "complete", "<k>shot": {"per_fold", "mean", ["paper_per_fold", "paper_mean", "difference"]}}."""
    folds = sorted(metrics)
    out = {"folds": folds, "complete": len(folds) == 4 or cfg.data.benchmark == "folder"}
    keys = sorted({k for m in metrics.values() for k in m if k.endswith("shot") and isinstance(m[k], dict)},
                  key=lambda k: int(k.split("shot")[0]))
    paper = None
    if cfg.eval.paper:
        from pipeline.paper import published
        paper = published(cfg.eval.paper)
    for key in keys:
        per_fold = {str(f): metrics[f][key]["miou"] for f in folds if key in metrics[f]}
        row = {"per_fold": per_fold, "mean": round(sum(per_fold.values()) / len(per_fold), 2)}
        if paper and key in paper:
            ref = {str(f): paper[key][f] for f in folds if str(f) in per_fold}
            row.update(paper_per_fold=ref, paper_mean=round(sum(ref.values()) / len(ref), 2),
                       paper_mean_all_folds=round(sum(paper[key]) / 4, 2))
            row["difference"] = round(row["mean"] - row["paper_mean"], 2)
        out[key] = row
    if cfg.train.released:
        from pipeline.paper import released_paper
        ref = released_paper(cfg)
        if ref:
            out["released_paper"] = {k: ref[k] for k in ("1shot", "5shot")} | {"source": ref["source"]}
    return out


def table(s: dict, paper_source: str = "") -> str:
    folds = s["folds"]
    head = "| | " + " | ".join(f"fold {f}" for f in folds) + " | mean |"
    lines = [head, "|" + "---|" * (len(folds) + 2)]
    for key, row in s.items():
        if not (key.endswith("shot") and isinstance(row, dict)):
            continue
        lines.append(f"| {key} | " + " | ".join(f"{row['per_fold'].get(str(f), float('nan')):.2f}" for f in folds)
                     + f" | {row['mean']:.2f} |")
        if "paper_mean" in row:
            lines.append(f"| {key}, the paper | " + " | ".join(f"{row['paper_per_fold'][str(f)]:.2f}" for f in folds)
                         + f" | {row['paper_mean']:.2f} ({row['difference']:+.2f}) |")
    note = "" if s["complete"] else (f"\n\nMean of folds {folds} only: the paper's numbers are 4-fold means "
                                     f"(set split.folds: [0, 1, 2, 3]).")
    src = f"\n\nThe paper: {paper_source}." if paper_source else ""
    rel = s.get("released_paper")
    rel = (f"\n\nThe published model's own paper: {rel['source']}: 1-shot {rel['1shot']}, 5-shot {rel['5shot']}."
           if rel else "")
    return "\n".join(lines) + note + src + rel + "\n"


def main():
    args, cfg = setup(__doc__)
    metrics = {}
    for fold in cfg.split.folds:
        path = Path("metrics") / f"fold{fold}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; run `dvc repro report@{fold}`")
        metrics[fold] = json.loads(path.read_text())
    s = summarise(cfg, metrics)
    source = ""
    if cfg.eval.paper:
        from pipeline.paper import published
        source = published(cfg.eval.paper)["source"]
    path = write_json(OUT / "folds.json", s)
    text = table(s, source)
    (OUT / "folds.md").write_text(text)
    print(f"summary over folds {s['folds']} -> {path}:\n{text}")


if __name__ == "__main__":
    run(main)
