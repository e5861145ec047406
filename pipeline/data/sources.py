"""Where the real benchmarks and backbone weights come from (official URLs and checksums)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from .benchmarks import check_benchmark, data_workers, raw_dir
from .download import Resource, download, extract, mirrored, require_space

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
                    resources=None, folder=None, keep_archives: bool = True) -> Path:
    """Download, verify and extract a real benchmark, or generate the synthetic one, into raw/<benchmark>.
    A folder benchmark (``folder``: its data.folder config) is read in place by prepare: raw/folder
    only records where it is and what it holds.

    ``resources`` replaces the official (resource, marker) list, e.g. for a private mirror with
    its own checksums. What was verified before is kept and skipped (``Verified``); without
    ``keep_archives`` each archive is deleted once extracted.
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
    require_space(raw, disk_needed([r for r, m in todo if m], keep_archives) + sum(r.size or 0 for r, m in todo if not m),
                  f"{benchmark} ({len(todo)} of {len(resources)} files to fetch)")
    for res, marker in resources:
        if (res, marker) not in todo:
            log.info("%s: verified%s before, kept", res.filename, " and extracted" if marker else "")
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
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.files, indent=1) + "\n")
        os.replace(tmp, self.path)
