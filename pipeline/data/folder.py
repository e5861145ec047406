"""Your own images and classes as a benchmark (``data.benchmark: folder``, ``data.folder.root``).

<root>/
    images/<name>.jpg|.jpeg|.png   the images
    labels/<name>.png              class indices, the image's size: 0 background, i the i-th line of
    classes.txt                    classes.txt (one class name per line), 255 ignore
    annotations.json               instead of labels/ and classes.txt: COCO instances over images/
    train.txt, val.txt             optional: image names of each list; else ``val_fraction`` of the
                                   images, drawn with ``seed``, are val (novel-class episodes)

The prepare stage reads it through ``folder_jobs`` into the prepared layout the rest of the pipeline
reads (pipeline/data/prepare.py validates every image and label there); folds come from
``fold_classes`` (pipeline/data/benchmarks.py).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
NAME = re.compile(r"[^\s/\\]+")


class FolderError(ValueError):
    pass


def _names(path: Path) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines() if line.split("#", 1)[0].strip()]


def _listing(path: Path, known: set[str]) -> list[str]:
    names = _names(path)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise FolderError(f"{path} names {len(unknown)} image(s) not in images/: {', '.join(unknown[:5])}")
    return names


def scan_images(images: Path) -> dict[str, Path]:
    """{name: file} of the images; other files are skipped with a warning that names them."""
    if not images.is_dir():
        raise FolderError(f"{images} is not a folder; put the images in <data.folder.root>/images/")
    found, skipped = {}, []
    for f in sorted(images.iterdir()):
        if f.suffix.lower() not in IMAGE_SUFFIXES or not f.is_file():
            skipped.append(f.name)
            continue
        if not NAME.fullmatch(f.stem):
            raise FolderError(f"image {f} has white space in its name; rename it (names go into list files)")
        if f.stem in found:
            raise FolderError(f"images {found[f.stem].name} and {f.name} share the name {f.stem!r}; rename one")
        found[f.stem] = f
    if skipped:
        log.warning("skipped %d file(s) in %s that are not .jpg/.jpeg/.png: %s", len(skipped), images,
                    ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    if not found:
        raise FolderError(f"{images} holds no .jpg, .jpeg or .png image")
    return found


def split_names(names: list[str], root: Path, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val): the folder's own train.txt/val.txt, or a seeded draw of ``val_fraction`` as val."""
    known = set(names)
    if (root / "train.txt").exists() or (root / "val.txt").exists():
        if not ((root / "train.txt").exists() and (root / "val.txt").exists()):
            raise FolderError(f"{root} has only one of train.txt and val.txt; give both or neither")
        train, val = _listing(root / "train.txt", known), _listing(root / "val.txt", known)
        both = sorted(set(train) & set(val))
        if both:
            raise FolderError(f"{len(both)} image(s) are in both train.txt and val.txt: {', '.join(both[:5])}")
        return train, val
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
    val = {names[i] for i in order[:n_val]}
    return [n for n in names if n not in val], sorted(val)


def coco_instances(ann: Path) -> tuple[list[str], list[tuple[dict, list]]]:
    """(class names in category-id order, [(image info, [(class id 1..N, segmentation, annotation id), ...])]) of
    a COCO instances file; crowd regions are left out (background), as PFENet and BAM do."""
    from pycocotools.coco import COCO
    coco = COCO(str(ann))
    cat_ids = sorted(coco.getCatIds())
    contiguous = {cid: k + 1 for k, cid in enumerate(cat_ids)}
    names = [coco.loadCats(cid)[0]["name"] for cid in cat_ids]
    images = []
    for img_id in sorted(coco.getImgIds()):
        anns = [(contiguous[a["category_id"]], _compact(a["segmentation"]), a.get("id"))
                for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=None)) if not a.get("iscrowd", 0)]
        images.append((coco.loadImgs(img_id)[0], anns))
    return names, images


def _compact(seg):
    """Polygons as float64 arrays (8 bytes a coordinate, not a Python float's 32; cheap to send to a worker);
    anything else (RLE, a malformed entry) as it is, for prepare to use or to skip with its id."""
    if isinstance(seg, list) and all(isinstance(p, list) for p in seg):
        try:
            return [np.asarray(p, np.float64) for p in seg]
        except (TypeError, ValueError):
            return seg
    return seg


def _coco_jobs(root: Path, images: dict[str, Path], out: Path):
    ann = root / "annotations.json"
    try:
        names, entries = coco_instances(ann)
    except Exception as e:
        raise FolderError(f"{ann} is not a readable COCO instances file ({type(e).__name__}: {e})") from e
    if not names:
        raise FolderError(f"{ann} declares no categories")
    jobs = []
    for info, anns in entries:
        stem = Path(info["file_name"]).stem
        if stem not in images:
            raise FolderError(f"{ann} annotates {info['file_name']}, which is not in {root / 'images'}")
        jobs.append((stem, images[stem], "coco", (info["height"], info["width"], anns), out, len(names)))
    missing = sorted(set(images) - {j[0] for j in jobs})
    if missing:
        log.warning("%d image(s) have no entry in %s and are left out: %s", len(missing), ann, ", ".join(missing[:10]))
    return jobs, names


def folder_jobs(root: str | Path, out: Path, val_fraction: float = 0.25, seed: int = 0):
    """(jobs for prepare's workers, train names, val names, class names) of the folder at ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FolderError(f"data.folder.root: {root} is not a folder")
    images = scan_images(root / "images")
    if (root / "annotations.json").exists():
        jobs, names = _coco_jobs(root, images, out)
    else:
        classes = root / "classes.txt"
        if not classes.exists():
            raise FolderError(f"{classes} is missing: list the class names there, one per line (line i is label "
                              "value i), or give a COCO annotations.json")
        names = _names(classes)
        if not names or len(names) > 254 or len(set(names)) < len(names):
            raise FolderError(f"{classes} must list 1 to 254 distinct class names, one per line (it has {len(names)})")
        labels = root / "labels"
        missing = [n for n in images if not (labels / f"{n}.png").exists()]
        if missing:
            raise FolderError(f"{len(missing)} image(s) have no label {labels}/<name>.png: {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else ""))
        orphans = sorted({p.stem for p in labels.glob("*.png")} - set(images))
        if orphans:
            log.warning("%d label(s) in %s have no image and are left out: %s", len(orphans), labels,
                        ", ".join(orphans[:10]))
        jobs = [(n, f, "png", labels / f"{n}.png", out, len(names)) for n, f in images.items()]
    kept = [j[0] for j in jobs]
    train, val = split_names(kept, root, val_fraction, seed)
    listed = set(train) | set(val)
    jobs = [j for j in jobs if j[0] in listed]
    return jobs, train, val, names


def class_report(pixels: dict, names: list[str], skipped: dict | None = None) -> list[dict]:
    """Per class: images holding it and its pixels, from prepare's class_pixels.json; with ``skipped``
    ({image: [(annotation id, class id, why), ...]}), the annotations prepare could not draw."""
    rows = [{"id": c, "name": n, "images": 0, "pixels": 0} for c, n in enumerate(names, 1)]
    for counts in pixels.values():
        for c, n in counts.items():
            rows[int(c) - 1]["images"] += 1
            rows[int(c) - 1]["pixels"] += int(n)
    for image, anns in (skipped or {}).items():
        for ann_id, c, why in anns:
            rows[int(c) - 1].setdefault("skipped_annotations", []).append({"id": ann_id, "image": image, "why": why})
    return rows


def format_report(rows: list[dict]) -> str:
    w = max(5, *(len(r["name"]) for r in rows))
    lines = [f"{'id':>3s}  {'class':{w}s}  {'images':>7s}  {'pixels':>10s}"]
    lines += [f"{r['id']:3d}  {r['name']:{w}s}  {r['images']:7d}  {r['pixels']:10d}" for r in rows]
    return "\n".join(lines)


def save_report(path: Path, rows: list[dict]) -> None:
    path.write_text(json.dumps(rows, indent=1))
