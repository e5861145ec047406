"""Fold splits: (image, class) pairs under the 2048-pixel rule, PFENet's or BAM's image filter."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class SplitError(ValueError):
    pass


def fold_pairs(class_pixels: dict, train_ids: list[str], val_ids: list[str], novel: list[int], base: list[int],
               min_pixels: int = 2048, rule: str = "bam") -> tuple[list, list]:
    """Train pairs over base classes, val pairs over novel classes.

    A pair is kept when the class covers at least ``min_pixels`` pixels of the image. With ``rule='bam'``
    (``filter_intersection``), a training image holding any pixel of a novel class is dropped entirely.
    """
    if rule not in ("bam", "pfenet"):
        raise ValueError(f"unknown split filter {rule!r}; choose 'bam' or 'pfenet'")
    novel_set = set(novel)
    train = []
    for i in train_ids:
        counts = {int(k): v for k, v in class_pixels[i].items()}
        if rule == "bam" and any(c in novel_set for c in counts):
            continue
        train += [(i, c) for c in base if counts.get(c, 0) >= min_pixels]
    val = []
    for i in val_ids:
        counts = {int(k): v for k, v in class_pixels[i].items()}
        val += [(i, c) for c in novel if counts.get(c, 0) >= min_pixels]
    return train, val


def _write_jsonl(path: Path, pairs) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"image": i, "class": c}) + "\n" for i, c in pairs))
    os.replace(tmp, path)


def read_pairs(path: str | Path) -> list[tuple[str, int]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"split file {path} is missing; run `dvc repro split` first")
    return [(d["image"], int(d["class"])) for d in map(json.loads, path.read_text().splitlines()) if d]


def images_per_class(pairs) -> dict[int, set[str]]:
    """{class: the distinct images holding it} of (image, class) pairs."""
    out: dict[int, set[str]] = {}
    for i, c in pairs:
        out.setdefault(c, set()).add(i)
    return out


def too_few(val: list, novel: list[int], names: list[str] | None = None) -> list[str]:
    """The novel classes with fewer than two val images: an episode needs a query and a support."""
    per = images_per_class(val)
    counts = {c: len(per.get(c, ())) for c in novel}
    return [f"{names[c - 1] if names else c} ({n} image{'s' if n != 1 else ''})" for c, n in counts.items() if n < 2]


def make_splits(prepared: str | Path, out: str | Path, folds: dict, min_pixels: int, rule: str,
                checked=(), names: list[str] | None = None) -> dict:
    """Write train/val pairs of every fold in ``folds`` ({fold: (novel, base)}). A fold in ``checked``
    (a folder benchmark's folds to be trained) must give every novel class two val images and have
    training pairs, or nothing is written; for the others it is a warning (episodes skip such a class)."""
    prepared, out = Path(prepared), Path(out)
    if not (prepared / "class_pixels.json").exists():
        raise FileNotFoundError(f"{prepared}/class_pixels.json is missing; run `dvc repro prepare` first")
    pixels = json.loads((prepared / "class_pixels.json").read_text())
    train_ids = (prepared / "train.txt").read_text().split()
    val_ids = (prepared / "val.txt").read_text().split()
    pairs = {fold: fold_pairs(pixels, train_ids, val_ids, novel, base, min_pixels, rule)
             for fold, (novel, base) in folds.items()}
    for fold, (train, val) in pairs.items():
        short = too_few(val, folds[fold][0], names)
        problem = (f"fold {fold}: novel class(es) {', '.join(short)} with fewer than two val images of at least "
                   f"{min_pixels} pixels; an episode needs a query and a support") if short else \
            (f"fold {fold}: no training image holds a base class with {min_pixels} pixels" if not train else None)
        if problem and fold in checked:
            raise SplitError(f"{problem}. Add images, lower split.min_pixels, or choose other novel classes "
                             "(split.novel_classes, split.num_folds)")
        if problem:
            log.warning("%s; episodes will skip it", problem)
    summary = {}
    for fold, (novel, base) in folds.items():
        train, val = pairs[fold]
        d = out / f"fold{fold}"
        d.mkdir(parents=True, exist_ok=True)
        _write_jsonl(d / "train.jsonl", train)
        _write_jsonl(d / "val.jsonl", val)
        (d / "classes.json").write_text(json.dumps({"novel": novel, "base": base}))
        per_class = {}
        for _, c in train + val:
            per_class[str(c)] = per_class.get(str(c), 0) + 1
        summary[f"fold{fold}"] = {"train_pairs": len(train), "val_pairs": len(val),
                                  "train_images": len({i for i, _ in train}), "val_images": len({i for i, _ in val}),
                                  "pairs_per_class": dict(sorted(per_class.items(), key=lambda kv: int(kv[0])))}
    return summary


def compare_with_reference(out: str | Path, folds, reference: str | Path) -> dict:
    """Each fold's training images against the authors' ``data_list_<fold>.txt`` (lines ``.../JPEGImages/<id>.jpg
    .../<label>.png``, as the SVF authors' lists/pascal/fss_list/train hold them): {fold: {"ours", "theirs",
    "both", "only_ours", "only_theirs" (the first 10 of each)}}, written to <out>/reference.json."""
    out, reference = Path(out), Path(reference)
    report = {}
    for fold in folds:
        path = reference / f"data_list_{fold}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"split.reference_lists: {path} is missing (one data_list_<fold>.txt a fold)")
        theirs = {Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()}
        ours = {json.loads(x)["image"] for x in (out / f"fold{fold}" / "train.jsonl").read_text().splitlines()}
        report[str(fold)] = {"ours": len(ours), "theirs": len(theirs), "both": len(ours & theirs),
                             "only_ours": sorted(ours - theirs)[:10], "only_theirs": sorted(theirs - ours)[:10],
                             "same": ours == theirs}
        if ours != theirs:
            log.warning("fold %s: %d training images here, %d in %s, %d in both (only here: %s; only there: %s)", fold,
                        len(ours), len(theirs), path, len(ours & theirs), report[str(fold)]["only_ours"][:3],
                        report[str(fold)]["only_theirs"][:3])
    (out / "reference.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
