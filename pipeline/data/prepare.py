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

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .benchmarks import AUG, SYNTHETIC_CLASSES, VOC_CLASSES, check_benchmark, read_ids
from .download import link_or_copy as _link
from .folder import class_report, coco_instances, folder_jobs

log = logging.getLogger(__name__)


class PrepareError(RuntimeError):
    pass


def _polygon_mask(polys, h: int, w: int) -> tuple[int, int, np.ndarray]:
    """(top, left, mask) of COCO polygons rasterised in their bounding box, not the whole image: 10x cheaper
    for a typical object (0.07 against 0.65 ms at 640x480, most of it pycocotools' decode filling the whole
    image). The shift is applied to the integers pycocotools rounds 5 x each coordinate to (below), so its
    rasteriser sees the same problem moved; as a guard the box's pixel count is compared with the whole-image
    RLE's area (cheap, no decode), and a difference decodes the whole image (none in 20,000 random polygons;
    tests/test_data.py compares the pixels on thousands)."""
    from pycocotools import mask as mask_utils
    whole = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    pts = np.concatenate(polys)
    xs, ys = pts[0::2], pts[1::2]
    x0 = min(w - 1, max(0, int(np.floor(xs.min())) - 1))
    y0 = min(h - 1, max(0, int(np.floor(ys.min())) - 1))
    x1 = min(w, max(x0 + 1, int(np.ceil(xs.max())) + 2))
    y1 = min(h, max(y0 + 1, int(np.ceil(ys.max())) + 2))
    # pycocotools first rounds 5 * coordinate + 0.5 toward zero; done here with the same double arithmetic,
    # the shifted coordinates hand it exactly those integers less 5 x the shift (2-decimal COCO coordinates
    # sit on that rounding's ties: shifted raw, 36% of them came out different)
    # (an axis not shifted keeps its coordinates: they may be negative, where that rounding is not a floor)
    shift = np.tile(np.array([x0, y0], np.float64), len(pts) // 2)
    moved = np.where(shift > 0, (np.trunc(5.0 * pts + 0.5) - 5.0 * shift) / 5.0, pts)
    shifted = np.split(moved, np.cumsum([len(p) for p in polys])[:-1])
    box = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(shifted, y1 - y0, x1 - x0)))
    if int(box.sum()) != int(mask_utils.area(whole)):
        return 0, 0, mask_utils.decode(whole)
    return y0, x0, box


def _coco_label(h: int, w: int, anns) -> tuple[np.ndarray, list]:
    """Paint the annotations in their order; one that cannot be drawn (a polygon of fewer than 3 points, a
    malformed RLE) is skipped and returned as (annotation id, class id, why), never fatal."""
    from pycocotools import mask as mask_utils
    label = np.zeros((h, w), np.uint8)
    skipped = []
    for cid, seg, ann_id in anns:
        try:
            if isinstance(seg, list):
                polys = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
                if not polys:
                    raise ValueError(f"no polygon of 3 or more points ({[len(p) // 2 for p in seg]} points)")
                y0, x0, m = _polygon_mask([np.asarray(p, np.float64) for p in polys], h, w)
                label[y0:y0 + m.shape[0], x0:x0 + m.shape[1]][m.view(bool)] = cid
                continue
            elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = seg
            m = mask_utils.decode(rle)
            if m.shape != (h, w):
                raise ValueError(f"mask of {m.shape[1]}x{m.shape[0]} on an image of {w}x{h}")
        except Exception as e:     # pycocotools raises bare Exception and TypeError for malformed input
            skipped.append((ann_id, cid, f"{type(e).__name__}: {e}"))
            continue
        label[m.view(bool)] = cid
    return label, skipped


def _load_label(kind: str, src) -> tuple[np.ndarray, list]:
    if kind == "png":
        with Image.open(src) as im:
            return np.asarray(im), []
    if kind == "mat":   # SBD: GTcls.Segmentation
        from scipy.io import loadmat
        mat = loadmat(src, mat_dtype=True, squeeze_me=True, struct_as_record=False)
        return np.asarray(mat["GTcls"].Segmentation, dtype=np.uint8), []
    if kind == "coco":  # (height, width, [(class id, segmentation, annotation id), ...])
        return _coco_label(*src)
    raise ValueError(kind)


def _check_image(img_src: Path) -> tuple[int, int]:
    """The image's size, after decoding all of it (a truncated or corrupt file raises). JPEGs decode at 1/8
    scale (libjpeg's DCT scaling reads every coefficient, skipping most of the inverse transform): 4x cheaper."""
    with Image.open(img_src) as im:
        size = im.size
        if im.format == "JPEG":
            im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        im.load()
    return size


def _prepare_one(job):
    """Verify and write one image/label pair; return (id, {class: pixels}, skipped annotations)."""
    image_id, img_src, label_kind, label_src, out, num_classes = job
    img_src = Path(img_src)
    try:
        size = _check_image(img_src)
    except Exception as e:
        raise PrepareError(f"corrupt or unreadable image {img_src}: {e}. Replace it (PASCAL or COCO: delete "
                           "data/raw/<benchmark>/verified.json and run `dvc repro download`, which extracts the "
                           "verified archives again, or fetches them if they were deleted)") from e
    where = label_src if label_kind != "coco" else f"the annotations of {image_id}"
    try:
        label, skipped = _load_label(label_kind, label_src)
    except Exception as e:
        raise PrepareError(f"corrupt or unreadable label {where}: {e}") from e
    if label.ndim != 2:
        raise PrepareError(f"label {label_src} has {label.shape[2]} channels; a label is a single-channel PNG of "
                           f"class indices (0 background, 1..{num_classes} the classes, 255 ignore)")
    if (label.shape[1], label.shape[0]) != size:
        raise PrepareError(f"label {where} is {label.shape[1]}x{label.shape[0]}, its image {img_src} is "
                           f"{size[0]}x{size[1]}: the two must be the same size")
    counts = np.bincount(label.ravel(), minlength=256)
    bad = [int(v) for v in np.flatnonzero(counts) if v != 255 and v > num_classes]
    if bad:
        raise PrepareError(f"label {where} holds class ids {bad} outside 0..{num_classes} and 255")
    out = Path(out)
    _link(img_src, out / "images" / f"{image_id}.jpg")
    if label_kind == "png" and _is_gray_png(label_src):
        _link(Path(label_src), out / "labels" / f"{image_id}.png")
    else:
        write_label_png(out / "labels" / f"{image_id}.png", label)
    return image_id, {int(c): int(counts[c]) for c in range(1, num_classes + 1) if counts[c]}, skipped


def write_label_png(path: Path, label: np.ndarray) -> None:
    """An 8-bit greyscale PNG of ``label``, its rows unfiltered and deflated with zlib's run-length strategy:
    label maps are runs of one value, so this is 2.6x faster than Pillow's encoder at its fastest level and the
    files are half the size (0.91 against 2.40 ms, 3.8 against 6.9 KB a COCO label); any PNG reader reads it."""
    h, w = label.shape
    rows = np.zeros((h, w + 1), np.uint8)       # each row: filter type 0, then its bytes
    rows[:, 1:] = label
    z = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    data = z.compress(rows.tobytes()) + z.flush()

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _is_gray_png(path) -> bool:
    with Image.open(path) as im:
        return im.mode == "L"


def _read_list(path: Path) -> list[str]:
    if not path.exists():
        raise PrepareError(f"list file {path} is missing; run `dvc repro download` first")
    try:
        return read_ids(path)
    except ValueError as e:
        raise PrepareError(str(e)) from None


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
    aug = raw / AUG
    if aug.is_dir():       # data.local's converted labels, as the authors' lists name them, for every image
        missing = [i for i in train + voc_val if not (aug / f"{i}.png").is_file()]
        if missing:        # the user's own tree: say what it lacks (train_noval.txt may have come after its check)
            raise PrepareError(f"{len(missing)} of the {len(train + voc_val)} labels VOC's lists and train_noval.txt "
                               f"name are missing from {aug.resolve()}, e.g. {', '.join(missing[:3])}: complete that "
                               "folder, or set data.local to a tree without SegmentationClassAug (SBD's labels)")
        log.info("pascal: every label from %s", aug)
        return [(i, voc / "JPEGImages" / f"{i}.jpg", "png", aug / f"{i}.png", out, 20) for i in train + voc_val], \
            train, voc_val, VOC_CLASSES
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


JOURNAL = "done.jsonl"


def _resume(tmp: Path, jobs: list) -> dict:
    """What an earlier, interrupted run of the same jobs finished (tmp/done.jsonl, a line per image, written
    after its files); anything else in ``tmp`` is started over."""
    key = hashlib.sha256(json.dumps([[j[0], str(j[1]), j[2]] for j in jobs]).encode()
                         + Path(__file__).read_bytes()).hexdigest()
    done = {}
    if (tmp / "jobs.sha256").exists() and (tmp / "jobs.sha256").read_text() == key and (tmp / JOURNAL).exists():
        for line in (tmp / JOURNAL).read_text().splitlines():
            try:
                image_id, counts, skipped = json.loads(line)
            except ValueError:          # the line a kill cut short
                continue
            done[image_id] = (counts, skipped)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "images").mkdir(parents=True)
        (tmp / "labels").mkdir(parents=True)
        (tmp / "jobs.sha256").write_text(key)
    return done


def prepare(benchmark: str, raw: str | Path, out: str | Path, workers: int = 2, folder=None) -> dict:
    """Convert the raw benchmark (for ``folder``: the user's folder, ``folder`` its data.folder config)
    into the prepared layout, in ``workers`` processes (0: in this one). The work goes to a hidden sibling first, which
    replaces ``out`` only once complete: an error or a kill leaves ``out`` as it was, and the next run
    of the same jobs continues where that one stopped. An annotation that cannot be drawn is skipped and
    listed in class_report.json."""
    check_benchmark(benchmark)
    raw, out = Path(raw), Path(out)
    if not raw.exists():
        raise PrepareError(f"data.folder.root: {raw} does not exist" if benchmark == "folder" else
                           f"raw data {raw} is missing; run `dvc repro download` first")
    tmp = out.parent / f".{out.name}.tmp"
    if benchmark == "folder":
        jobs, train, val, names = folder_jobs(raw, tmp, folder.val_fraction, folder.seed)
    else:
        jobs, train, val, names = {"synthetic": _jobs_synthetic, "pascal": _jobs_pascal,
                                   "coco": _jobs_coco}[benchmark](raw, tmp)
    done = _resume(tmp, jobs)
    if done:
        log.info("prepare: %d of %d images done by an earlier run, continuing", len(done), len(jobs))
    todo = [j for j in jobs if j[0] not in done]
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                      else "spawn")    # workers without the parent's parsed annotations
    with open(tmp / JOURNAL, "a") as journal, contextlib.ExitStack() as stack:
        workers = min(workers, len(todo) // 64 + 1)         # a process pays off from 64 images on
        if workers > 1:
            ex = stack.enter_context(ProcessPoolExecutor(workers, mp_context=ctx))
            results = ex.map(_prepare_one, todo, chunksize=32)
        else:           # in this process (benchmarks/data_scale.py measures a job's CPU so, with workers 0)
            results = map(_prepare_one, todo)
        for image_id, counts, skipped in tqdm(results, total=len(todo), desc=f"prepare {benchmark}", unit="img",
                                              mininterval=1.0):
            done[image_id] = (counts, skipped)
            journal.write(json.dumps([image_id, counts, skipped]) + "\n")
            journal.flush()
    pixels = {i: {str(c): n for c, n in done[i][0].items()} for i in (j[0] for j in jobs)}
    skipped = {i: done[i][1] for i in pixels if done[i][1]}
    (tmp / "train.txt").write_text("\n".join(train) + "\n")
    (tmp / "val.txt").write_text("\n".join(val) + "\n")
    (tmp / "classes.json").write_text(json.dumps({"benchmark": benchmark, "num_classes": len(names),
                                                  "names": names}, indent=1))
    (tmp / "class_pixels.json").write_text(json.dumps(pixels))
    report = class_report(pixels, names, skipped)
    (tmp / "class_report.json").write_text(json.dumps(report, indent=1))
    for f in (JOURNAL, "jobs.sha256"):
        (tmp / f).unlink()
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    absent = [r["name"] for r in report if not r["images"]]
    if absent and benchmark == "folder":
        log.warning("class(es) %s appear in no label: the class list and the labels do not match", ", ".join(absent))
    n_skipped = sum(len(v) for v in skipped.values())
    if n_skipped:
        first = [f"{a} ({i})" for i, v in skipped.items() for a, _, _ in v][:10]
        log.warning("%d annotation(s) of %d image(s) could not be drawn and were skipped (listed per class in %s): "
                    "%s%s", n_skipped, len(skipped), out / "class_report.json", ", ".join(first),
                    " ..." if n_skipped > 10 else "")
    return {"train_images": len(train), "val_images": len(val), "classes": report,
            "skipped_annotations": n_skipped}
