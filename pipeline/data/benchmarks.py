"""Benchmark definitions: class names, fold class sets, and where each stage puts its files.

Imports nothing of the project: the download stage runs it, and DVC reruns that stage only when what it
fetches changes (dvc.yaml), never for an edit of the config schema or the models."""
from __future__ import annotations

import json
import os
from pathlib import Path

BENCHMARKS = ("synthetic", "pascal", "coco", "folder")
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
# PFENet's converted PASCAL labels (VOC and SBD as greyscale PNGs) in raw/pascal or data.local: every label from there
AUG = "VOCdevkit/VOC2012/SegmentationClassAug"
SYNTHETIC_CLASSES = ["disc", "square", "triangle", "star", "cross", "ring", "hexagon", "ellipse", "diamond",
                     "crescent", "arrow", "pentagon", "ell", "tee", "trapezoid", "semicircle", "heart",
                     "chevron", "hourglass", "octagon"]
NUM_CLASSES = {"synthetic": 20, "pascal": 20, "coco": 80}
FOLDS = (0, 1, 2, 3)
COCO_SPLITS = ("interleaved", "consecutive")


def data_workers(workers) -> int:
    """``data.workers`` as a process count: ``auto`` is every core this process may use."""
    if workers == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return int(workers)


def check_benchmark(name: str) -> str:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {list(BENCHMARKS)}")
    return name


def novel_classes(benchmark: str, fold: int, coco_split: str = "interleaved") -> list[int]:
    """Class ids (1-based) held out as novel in ``fold``.

    PASCAL-5i and the synthetic set: 5*fold+1 .. 5*fold+5. COCO-20i interleaved (PFENet
    ``use_split_coco``): {fold+1, fold+5, ..., fold+77}; consecutive: 20*fold+1 .. 20*fold+20.
    """
    check_benchmark(benchmark)
    if benchmark == "folder":
        raise ValueError("a folder benchmark's folds depend on its class list: use fold_classes(cfg, fold)")
    if fold not in FOLDS:
        raise ValueError(f"unknown fold {fold!r}; choose one of {list(FOLDS)}")
    if benchmark == "coco":
        if coco_split == "interleaved":
            return list(range(fold + 1, 81, 4))
        if coco_split == "consecutive":
            return list(range(20 * fold + 1, 20 * fold + 21))
        raise ValueError(f"unknown COCO fold convention {coco_split!r}; choose one of {list(COCO_SPLITS)}")
    return list(range(5 * fold + 1, 5 * fold + 6))


def base_classes(benchmark: str, fold: int, coco_split: str = "interleaved") -> list[int]:
    novel = set(novel_classes(benchmark, fold, coco_split))
    return [c for c in range(1, NUM_CLASSES[benchmark] + 1) if c not in novel]


def protocol_folds(benchmark: str, folds, coco_split: str = "interleaved") -> dict:
    """{fold: (novel, base)} of a benchmark whose folds its protocol fixes."""
    return {f: (novel_classes(benchmark, f, coco_split), base_classes(benchmark, f, coco_split)) for f in folds}


def folder_novel(num_classes: int, fold: int, num_folds: int) -> list[int]:
    """Class ids 1..N cut into ``num_folds`` contiguous blocks, as PASCAL-5i cuts its 20 (fold i: 5i+1..5i+5);
    block sizes differ by at most one."""
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold {fold} does not exist; there are {num_folds}")
    return list(range(fold * num_classes // num_folds + 1, (fold + 1) * num_classes // num_folds + 1))


def require(path: str | Path, what: str, stage: str) -> Path:
    """``path``, or a FileNotFoundError naming it and the stage that makes it. The stages call it before
    importing torch, so a missing input fails in a fraction of a second."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} is missing; run the {stage} stage (`dvc repro {stage}`) first")
    return path


def class_names(prepared: str | Path) -> list[str]:
    """The prepared benchmark's class names (index i-1 is class id i)."""
    path = Path(prepared) / "classes.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `dvc repro prepare` first")
    return json.loads(path.read_text())["names"]


def fold_classes(cfg, fold: int) -> tuple[list[int], list[int]]:
    """(novel, base) class ids of ``fold`` for the configured benchmark: the protocol's for PASCAL-5i,
    COCO-20i and the synthetic set; for a folder, its class list cut into ``split.num_folds`` blocks,
    or ``split.novel_classes`` (names or ids) as the one fold."""
    d, s = cfg.data, cfg.split
    if d.benchmark != "folder":
        return protocol_folds(d.benchmark, [fold], d.coco_split)[fold]
    names = class_names(prepared_dir(d.root, "folder"))
    if s.novel_classes:
        if fold != 0:
            raise ValueError(f"fold {fold} does not exist: split.novel_classes makes a single fold 0")
        novel = []
        for c in s.novel_classes:
            if isinstance(c, str):
                if c not in names:
                    raise ValueError(f"split.novel_classes: {c!r} is not in the class list {names}")
                c = names.index(c) + 1
            if not 1 <= c <= len(names):
                raise ValueError(f"split.novel_classes: class id {c} is outside 1..{len(names)}")
            novel.append(c)
        novel = sorted(novel)
    else:
        novel = folder_novel(len(names), fold, s.num_folds)
    base = [c for c in range(1, len(names) + 1) if c not in novel]
    if not novel or not base:
        raise ValueError(f"fold {fold} has {len(novel)} novel and {len(base)} base classes; both must be at least one "
                         f"(the folder has {len(names)} classes, split.num_folds is {s.num_folds})")
    return novel, base


def fold_ids(cfg) -> list[int]:
    """Every fold the configured benchmark has (the split stage writes them all)."""
    if cfg.data.benchmark != "folder":
        return list(FOLDS)
    return [0] if cfg.split.novel_classes else list(range(cfg.split.num_folds))


def raw_dir(root, benchmark) -> Path:
    return Path(root) / "raw" / benchmark


def prepared_dir(root, benchmark) -> Path:
    return Path(root) / "prepared" / benchmark


def split_dir(root, benchmark, fold=None) -> Path:
    d = Path(root) / "splits" / benchmark
    return d if fold is None else d / f"fold{fold}"


def read_ids(path: Path) -> list[str]:
    """The image ids of a list file (the first word of each line). An id is a file name's stem: one that would
    name a file outside its folder (a separator, a leading dot) is refused, as lists from a user's tree are
    not checksummed and prepare writes <prepared>/images/<id>.jpg."""
    ids = [line.split()[0] for line in Path(path).read_text().splitlines() if line.strip()]
    bad = [i for i in ids if "/" in i or "\\" in i or i.startswith(".")]
    if bad:
        raise ValueError(f"{path}: {len(bad)} id(s) that are not plain file names, e.g. {bad[0]!r}")
    return ids
