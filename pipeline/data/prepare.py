"""Raw downloads -> the prepared layout every later stage reads, one code path for all benchmarks.

prepared/<benchmark>/
    images/<id>.jpg         (hard links to the raw images where possible)
    labels/<id>.png         uint8 class ids: 0 background, 1..N classes, 255 ignore
    train.txt, val.txt      image ids
    classes.json            {"benchmark", "names": [...]} (index i-1 is class id i)
    class_pixels.json       {id: {class id: pixel count}} for the fold filters of the split stage
    class_report.json       per class: images holding it, pixels

Benchmarks: synthetic, pascal, coco from their raw downloads; folder from the user's folder
(pipeline/data/folder.py).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .benchmarks import SYNTHETIC_CLASSES, VOC_CLASSES, check_benchmark
from .download import link_or_copy as _link
from .folder import class_report, coco_instances, folder_jobs

log = logging.getLogger(__name__)


class PrepareError(RuntimeError):
    pass


def _load_label(kind: str, src) -> np.ndarray:
    if kind == "png":
        return np.asarray(Image.open(src))
    if kind == "mat":   # SBD: GTcls.Segmentation
        from scipy.io import loadmat
        mat = loadmat(src, mat_dtype=True, squeeze_me=True, struct_as_record=False)
        return np.asarray(mat["GTcls"].Segmentation, dtype=np.uint8)
    if kind == "coco":  # (height, width, [(class id, segmentation), ...]) painted in annotation order
        from pycocotools import mask as mask_utils
        h, w, anns = src
        label = np.zeros((h, w), np.uint8)
        for cid, seg in anns:
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            elif isinstance(seg.get("counts"), list):
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = seg
            label[mask_utils.decode(rle) > 0] = cid
        return label
    raise ValueError(kind)


def _prepare_one(job):
    """Verify and write one image/label pair; return (id, {class: pixels})."""
    image_id, img_src, label_kind, label_src, out, num_classes = job
    img_src = Path(img_src)
    try:
        with Image.open(img_src) as im:
            im.load()
            size = im.size
    except Exception as e:
        raise PrepareError(f"corrupt or unreadable image {img_src}: {e}. Replace it (PASCAL or COCO: delete "
                           "data/raw/<benchmark>/verified.json and run `dvc repro download`, which extracts the "
                           "verified archives again, or fetches them if they were deleted)") from e
    try:
        label = _load_label(label_kind, label_src)
    except Exception as e:
        where = label_src if label_kind != "coco" else f"annotations of {image_id}"
        raise PrepareError(f"corrupt or unreadable label {where}: {e}") from e
    if label.ndim != 2:
        raise PrepareError(f"label {label_src} has {label.shape[2]} channels; a label is a single-channel PNG of "
                           f"class indices (0 background, 1..{num_classes} the classes, 255 ignore)")
    if (label.shape[1], label.shape[0]) != size:
        raise PrepareError(f"label {label_src if label_kind != 'coco' else image_id} has shape {label.shape}, "
                           f"its image {img_src} is {size[0]}x{size[1]}")
    values = np.unique(label)
    bad = [int(v) for v in values if v != 255 and v > num_classes]
    if bad:
        raise PrepareError(f"label {label_src if label_kind != 'coco' else image_id} holds class ids {bad} "
                           f"outside 0..{num_classes} and 255")
    out = Path(out)
    _link(img_src, out / "images" / f"{image_id}.jpg")
    if label_kind == "png" and Image.open(label_src).mode == "L":
        _link(Path(label_src), out / "labels" / f"{image_id}.png")
    else:
        Image.fromarray(label.astype(np.uint8), mode="L").save(out / "labels" / f"{image_id}.png")
    counts = np.bincount(label.ravel(), minlength=256)
    return image_id, {int(c): int(counts[c]) for c in range(1, num_classes + 1) if counts[c]}


def _read_list(path: Path) -> list[str]:
    if not path.exists():
        raise PrepareError(f"list file {path} is missing; run `dvc repro download` first")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _jobs_synthetic(raw: Path, out: Path):
    train, val = _read_list(raw / "train.txt"), _read_list(raw / "val.txt")
    jobs = [(i, raw / "images" / f"{i}.jpg", "png", raw / "labels" / f"{i}.png", out, 20) for i in train + val]
    return jobs, train, val, SYNTHETIC_CLASSES


def _jobs_pascal(raw: Path, out: Path):
    voc = raw / "VOCdevkit" / "VOC2012"
    sbd = raw / "benchmark_RELEASE" / "dataset"
    voc_train = _read_list(voc / "ImageSets" / "Segmentation" / "train.txt")
    voc_val = _read_list(voc / "ImageSets" / "Segmentation" / "val.txt")
    sbd_train = _read_list(raw / "train_noval.txt")
    # OSLSM/PFENet train list: VOC train + SBD train_noval, duplicates removed, VOC val never included
    seen, train = set(voc_val), []
    for i in voc_train + sbd_train:
        if i not in seen:
            seen.add(i)
            train.append(i)
    voc_seg = set(voc_train) | set(voc_val)
    jobs = []
    for i in train + voc_val:
        if i in voc_seg:   # VOC's own annotation (with its 255 boundary band) takes precedence
            jobs.append((i, voc / "JPEGImages" / f"{i}.jpg", "png", voc / "SegmentationClass" / f"{i}.png", out, 20))
        else:
            jobs.append((i, voc / "JPEGImages" / f"{i}.jpg", "mat", sbd / "cls" / f"{i}.mat", out, 20))
    return jobs, train, voc_val, VOC_CLASSES


def _jobs_coco(raw: Path, out: Path):
    jobs, lists, names = [], {}, None
    for split in ("train", "val"):
        ann_file = raw / "annotations" / f"instances_{split}2014.json"
        if not ann_file.exists():
            raise PrepareError(f"{ann_file} is missing; run `dvc repro download` first")
        names, images = coco_instances(ann_file)
        if len(names) != 80:
            raise PrepareError(f"{ann_file} has {len(names)} categories, COCO-20i needs 80")
        ids = []
        for info, anns in images:
            stem = Path(info["file_name"]).stem
            ids.append(stem)
            jobs.append((stem, raw / f"{split}2014" / info["file_name"], "coco",
                         (info["height"], info["width"], anns), out, 80))
        lists[split] = ids
    return jobs, lists["train"], lists["val"], names


def prepare(benchmark: str, raw: str | Path, out: str | Path, workers: int = 2, folder=None) -> dict:
    """Convert the raw benchmark (for ``folder``: the user's folder, ``folder`` its data.folder config)
    into the prepared layout; writes to a temporary directory first, so an error leaves nothing."""
    check_benchmark(benchmark)
    raw, out = Path(raw), Path(out)
    if not raw.exists():
        raise PrepareError(f"data.folder.root: {raw} does not exist" if benchmark == "folder" else
                           f"raw data {raw} is missing; run `dvc repro download` first")
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    (tmp / "labels").mkdir(parents=True)
    pixels = {}
    try:
        if benchmark == "folder":
            jobs, train, val, names = folder_jobs(raw, tmp, folder.val_fraction, folder.seed)
        else:
            jobs, train, val, names = {"synthetic": _jobs_synthetic, "pascal": _jobs_pascal,
                                       "coco": _jobs_coco}[benchmark](raw, tmp)
        with ProcessPoolExecutor(max(1, workers)) as ex:
            for image_id, counts in tqdm(ex.map(_prepare_one, jobs, chunksize=32), total=len(jobs),
                                         desc=f"prepare {benchmark}", unit="img", mininterval=1.0):
                pixels[image_id] = counts
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / "train.txt").write_text("\n".join(train) + "\n")
    (tmp / "val.txt").write_text("\n".join(val) + "\n")
    (tmp / "classes.json").write_text(json.dumps({"benchmark": benchmark, "num_classes": len(names),
                                                  "names": names}, indent=1))
    (tmp / "class_pixels.json").write_text(json.dumps(pixels))
    report = class_report(pixels, names)
    (tmp / "class_report.json").write_text(json.dumps(report, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    absent = [r["name"] for r in report if not r["images"]]
    if absent and benchmark == "folder":
        log.warning("class(es) %s appear in no label: the class list and the labels do not match", ", ".join(absent))
    return {"train_images": len(train), "val_images": len(val), "classes": report}
