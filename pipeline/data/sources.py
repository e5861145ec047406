"""Where the real benchmarks and backbone weights come from (official URLs and checksums)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from .benchmarks import AUG, check_benchmark, data_workers, raw_dir, read_ids
from .download import ChecksumError, Resource, download, extract, mirrored, require_space

log = logging.getLogger(__name__)

VOC2012 = Resource("http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                   "VOCtrainval_11-May-2012.tar", md5="6cd6e144f989b92b3379bac3b3de84fd", size=1_999_639_040)
SBD = Resource("http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
               "benchmark.tgz", md5="82b4d87ceb2ed10f6038a1cba92111cb", size=1_419_539_633)
SBD_TRAIN_NOVAL = Resource("http://home.bharathh.info/pubs/codes/SBD/train_noval.txt", "train_noval.txt",
                           md5="79bff800c5f0b1ec6b21080a3c066722")
COCO_TRAIN = Resource("http://images.cocodataset.org/zips/train2014.zip", "train2014.zip",
                      md5="0da8c0bd3d6becc4dcb32757491aca88")
COCO_VAL = Resource("http://images.cocodataset.org/zips/val2014.zip", "val2014.zip",
                    md5="a3d79f5ed8d289b7a7554ce06a5782b3")
COCO_ANN = Resource("http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
                    "annotations_trainval2014.zip", md5="0a379cfc70b0e71301e0f377548639bd",
                    size=252_872_794)

# (resource, marker path that exists once extracted; None: not an archive)
PASCAL = [(VOC2012, "VOCdevkit/VOC2012/JPEGImages"), (SBD, "benchmark_RELEASE/dataset/cls"), (SBD_TRAIN_NOVAL, None)]
COCO = [(COCO_TRAIN, "train2014"), (COCO_VAL, "val2014"), (COCO_ANN, "annotations/instances_val2014.json")]


def fetch_benchmark(benchmark: str, root, mirror: str = "", synthetic=None, workers="auto",
                    resources=None, folder=None, keep_archives: bool = True, local: str | Path = "") -> Path:
    """Download, verify and extract a real benchmark, or generate the synthetic one, into raw/<benchmark>.
    A folder benchmark (``folder``: its data.folder config) is read in place by prepare: raw/folder
    only records where it is and what it holds.

    ``resources`` replaces the official (resource, marker) list, e.g. for a private mirror with
    its own checksums. What was verified before is kept and skipped (``Verified``); without
    ``keep_archives`` each archive is deleted once extracted. ``local`` (data.local): a folder holding the
    benchmark already, as archives (verified by checksum, extracted from there, never moved or deleted) or
    extracted trees (checked against their own lists, then linked): adopted instead of downloaded.
    """
    raw = raw_dir(root, check_benchmark(benchmark))
    if benchmark == "folder":
        src = Path(folder.root)
        if not src.is_dir():
            raise FileNotFoundError(f"data.folder.root: {src} is not a folder; point it to your images "
                                    "(layout: pipeline/data/folder.py, docs/own-data.md)")
        files = sorted(p for p in src.rglob("*") if p.is_file())
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "source.json.tmp").write_text(json.dumps({"root": folder.root, "files": len(files),
                                                         "bytes": sum(p.stat().st_size for p in files)}, indent=1))
        os.replace(raw / "source.json.tmp", raw / "source.json")
        log.info("folder benchmark: %d files in %s (read in place by prepare)", len(files), src)
        return raw
    if benchmark == "synthetic":
        from .synthetic import generate
        if synthetic is None:
            raise ValueError("the synthetic benchmark needs its data.synthetic parameters")
        tmp = raw.parent / f".{raw.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        counts = generate(tmp, synthetic.num_train, synthetic.num_val, synthetic.image_size, synthetic.seed,
                          data_workers(workers))
        shutil.rmtree(raw, ignore_errors=True)
        os.replace(tmp, raw)
        log.info("generated the synthetic benchmark (%s) in %s", counts, raw)
        return raw
    if resources is None:
        resources = PASCAL if benchmark == "pascal" else COCO
    verified = Verified(raw / VERIFIED)
    todo = [(res, marker) for res, marker in resources if not verified.done(res, raw, marker)]
    aug = benchmark == "pascal" and ((local and (Path(local) / AUG).is_dir()) or (raw / AUG).is_dir())
    fetch = [(r, m) for r, m in todo if not (aug and is_sbd(m))]      # an estimate: decided below, once VOC is in raw
    plain = sum(r.size or 0 for r, m in fetch if not m)
    require_space(raw, disk_needed([r for r, m in fetch if m], keep_archives) + plain,
                  f"{benchmark} ({len(fetch)} of {len(resources)} files to fetch)")
    for res, marker in resources:
        if is_sbd(marker) and (raw / AUG).is_dir():   # what prepare reads: the VOC tree in raw decides
            log.info("%s: not needed, every label comes from %s (the authors' converted labels)", res.filename, AUG)
            continue
        if (res, marker) not in todo:
            log.info("%s: verified%s before, kept", res.filename, " and extracted" if marker else "")
        elif local and adopt_local(benchmark, res, marker, Path(local), raw, verified):
            continue
        else:
            path = download(mirrored(res, mirror), raw / "archives", then_extract=bool(marker))
            verified.add(res, path)
            if marker:
                extract(path, raw)      # anew: what an earlier extraction left may be damaged
            else:
                shutil.copyfile(path, raw / f".{res.filename}.tmp")
                os.replace(raw / f".{res.filename}.tmp", raw / res.filename)
            verified.add(res, path, extracted=marker or res.filename)
        archive = raw / "archives" / res.filename
        if marker and not keep_archives and archive.exists():
            archive.unlink()
            log.info("%s deleted after extraction (data.keep_archives: false)", archive)
    log.info("%s downloaded, verified and extracted in %s", benchmark, raw)
    return raw


VERIFIED = "verified.json"


def is_sbd(marker: str | None) -> bool:
    return (marker or "").startswith("benchmark_RELEASE")


def adopt_local(benchmark: str, res: Resource, marker: str | None, local: Path, raw: Path, verified) -> bool:
    """``res`` taken from data.local when it is there: its archive (or plain file) by checksum, or its extracted
    tree (``marker`` present) after ``check_tree``. False when data.local holds neither (it is then downloaded)."""
    from .download import _check
    if not local.is_dir():
        raise FileNotFoundError(f"data.local: {local} is not a folder")
    tree = local / marker if marker else None
    if tree is not None and tree.exists():
        counts = check_tree(benchmark, local, marker)
        top = Path(marker).parts[0]
        link = raw / top
        raw.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            if link.resolve() != (local / top).resolve():
                raise FileExistsError(f"data.local: {link} exists and is not {local / top}; move it away first")
        else:
            link.symlink_to((local / top).resolve(), target_is_directory=True)
        verified.files[res.filename] = {"digest": res.digest, "adopted": str((local / top).resolve()),
                                        "checked": counts, "extracted": marker}
        verified.save()
        log.info("%s: adopted the extracted %s from %s (%s)", res.filename, top, local, counts)
        return True
    path = local / res.filename
    if not path.is_file():
        return False
    ok, expected, actual = _check(res, path)
    if not ok:                               # the user's file: named, left where it is, never moved or deleted
        raise ChecksumError(f"data.local: {path} fails its checksum (expected {expected}, got {actual}); it was left "
                            f"untouched: replace it, or remove it from {local} to download the file")
    verified.add(res, path)
    if marker:
        extract(path, raw)
    else:
        shutil.copyfile(path, raw / f".{res.filename}.tmp")
        os.replace(raw / f".{res.filename}.tmp", raw / res.filename)
    verified.add(res, path, extracted=marker or res.filename)
    log.info("%s: adopted from %s (checksum verified)%s", res.filename, local, ", extracted" if marker else "")
    return True


def check_tree(benchmark: str, local: Path, marker: str) -> dict:
    """An extracted tree checked against its own lists: every image and label the lists name is there. Returns
    counts; FileNotFoundError names what is missing (the first few) and how many."""
    def need(paths: list[Path], what: str) -> int:
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"data.local: {len(missing)} of the {len(paths)} {what} the lists name are missing "
                                    f"from {local}, e.g. {', '.join(str(p) for p in missing[:3])}")
        return len(paths)
    if benchmark == "pascal" and marker.startswith("VOCdevkit"):
        voc = local / "VOCdevkit" / "VOC2012"
        ids = {i for name in ("train", "val") for i in
               _ids(voc / "ImageSets" / "Segmentation" / f"{name}.txt")}
        labels, what = voc / "SegmentationClass", "VOC labels"
        if (local / AUG).is_dir():      # every label from there, SBD's images (train_noval.txt) included
            if (local / SBD_TRAIN_NOVAL.filename).is_file():
                ids |= set(_ids(local / SBD_TRAIN_NOVAL.filename))
            labels, what = local / AUG, "SegmentationClassAug labels"
        return {"images": need([voc / "JPEGImages" / f"{i}.jpg" for i in sorted(ids)], "VOC images"),
                "labels": need([labels / f"{i}.png" for i in sorted(ids)], what)}
    if benchmark == "pascal":
        sbd = local / "benchmark_RELEASE" / "dataset"
        ids = sorted(set(_ids(sbd / "train.txt")))
        counts = {"labels": need([sbd / "cls" / f"{i}.mat" for i in ids], "SBD labels")}
        voc = local / "VOCdevkit" / "VOC2012" / "JPEGImages"     # SBD's images are VOC's
        if voc.is_dir():
            counts["images"] = need([voc / f"{i}.jpg" for i in ids], "VOC images of SBD's labels")
        return counts
    split = Path(marker).parts[0]
    if split == "annotations":
        return {"annotations": need([local / "annotations" / f"instances_{s}2014.json" for s in ("train", "val")],
                                    "annotation files")}
    ann = local / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        raise FileNotFoundError(f"data.local: {ann} is needed to check {local / split} (it names the images)")
    names = [im["file_name"] for im in json.loads(ann.read_text())["images"]]
    return {"images": need([local / split / n for n in names], f"{split} images")}


def _ids(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"data.local: {path} is missing (the tree's own list of its images)")
    return read_ids(path)


def disk_needed(archives: list[Resource], keep_archives: bool) -> int:
    """Peak bytes for fetching and extracting ``archives`` one after another: each archive's files take
    about its size (JPEGs do not compress); without ``keep_archives`` only the largest archive is on disk at once."""
    sizes = [r.size or 0 for r in archives]
    return sum(sizes) * 2 if keep_archives else sum(sizes) + max(sizes, default=0)


class Verified:
    """raw/<benchmark>/verified.json: each fetched file's checksum, and what its extraction left, written
    as each step ends. A file recorded there with the checksum the code asks for, its extracted marker
    present, is never fetched, hashed or extracted again (not even once its archive is deleted)."""

    def __init__(self, path: Path):
        self.path = path
        self.files = json.loads(path.read_text()) if path.exists() else {}

    def done(self, res: Resource, raw: Path, marker: str | None) -> bool:
        rec = self.files.get(res.filename, {})
        return rec.get("digest") == res.digest and bool(rec.get("extracted")) and (raw / (marker or res.filename)).exists()

    def add(self, res: Resource, path: Path, extracted: str | None = None) -> None:
        self.files[res.filename] = {"digest": res.digest, "url": res.url, "bytes": path.stat().st_size,
                                    "extracted": extracted}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.files, indent=1) + "\n")
        os.replace(tmp, self.path)
