"""Benchmark definitions: class names, fold class sets, and where each stage puts its files."""
from __future__ import annotations

from pathlib import Path

from ..config import BENCHMARKS

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]
SYNTHETIC_CLASSES = ["disc", "square", "triangle", "star", "cross", "ring", "hexagon", "ellipse", "diamond",
                     "crescent", "arrow", "pentagon", "ell", "tee", "trapezoid", "semicircle", "heart",
                     "chevron", "hourglass", "octagon"]
NUM_CLASSES = {"synthetic": 20, "pascal": 20, "coco": 80}
FOLDS = (0, 1, 2, 3)
COCO_SPLITS = ("interleaved", "consecutive")


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


def raw_dir(root, benchmark) -> Path:
    return Path(root) / "raw" / benchmark


def prepared_dir(root, benchmark) -> Path:
    return Path(root) / "prepared" / benchmark


def split_dir(root, benchmark, fold=None) -> Path:
    d = Path(root) / "splits" / benchmark
    return d if fold is None else d / f"fold{fold}"
