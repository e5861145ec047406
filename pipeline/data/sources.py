"""Where the real benchmarks and backbone weights come from (official URLs and checksums)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from .benchmarks import check_benchmark, raw_dir
from .download import Resource, download, extract, link_or_copy

log = logging.getLogger(__name__)

VOC2012 = Resource("http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                   "VOCtrainval_11-May-2012.tar", md5="6cd6e144f989b92b3379bac3b3de84fd")
SBD = Resource("http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
               "benchmark.tgz", md5="82b4d87ceb2ed10f6038a1cba92111cb")
SBD_TRAIN_NOVAL = Resource("http://home.bharathh.info/pubs/codes/SBD/train_noval.txt", "train_noval.txt",
                           md5="79bff800c5f0b1ec6b21080a3c066722")
COCO_TRAIN = Resource("http://images.cocodataset.org/zips/train2014.zip", "train2014.zip",
                      md5="0da8c0bd3d6becc4dcb32757491aca88")
COCO_VAL = Resource("http://images.cocodataset.org/zips/val2014.zip", "val2014.zip",
                    md5="a3d79f5ed8d289b7a7554ce06a5782b3")
COCO_ANN = Resource("http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
                    "annotations_trainval2014.zip", md5="0a379cfc70b0e71301e0f377548639bd")

# (resource, marker path that exists once extracted; None: not an archive)
PASCAL = [(VOC2012, "VOCdevkit/VOC2012/JPEGImages"), (SBD, "benchmark_RELEASE/dataset/cls"), (SBD_TRAIN_NOVAL, None)]
COCO = [(COCO_TRAIN, "train2014"), (COCO_VAL, "val2014"), (COCO_ANN, "annotations/instances_val2014.json")]


# torchvision's ImageNet-1k V1 checkpoints by full sha256: their file names carry only the first 8 hex digits
IMAGENET_SHA256 = {
    "resnet18": "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec",
    "resnet34": "b627a593bcbe140c234610266fe4f8ae95ea42fc881d091c9b6052e6b1d0590f",
    "resnet50": "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a",
    "resnet101": "63fe2227b86e8f1f2063f43a75c84d195911b6a0eace650907dd3dc62dd49a0a",
}


def backbone_resource(arch: str) -> Resource:
    """torchvision's ImageNet checkpoint for ``arch``, verified by its full sha256 (IMAGENET_SHA256)."""
    import torchvision

    from ..models.backbone import WEIGHT_ENUMS
    if arch not in WEIGHT_ENUMS:
        raise ValueError(f"{arch} has no torchvision ImageNet checkpoint (those with one: {sorted(WEIGHT_ENUMS)})")
    url = getattr(torchvision.models, WEIGHT_ENUMS[arch]).IMAGENET1K_V1.url
    name = url.rsplit("/", 1)[-1]
    prefix = name.rsplit("-", 1)[-1].split(".")[0]
    if not IMAGENET_SHA256[arch].startswith(prefix):
        raise ValueError(f"torchvision {torchvision.__version__} names {name} for {arch}, whose full sha256 is not "
                         f"known here (known: {IMAGENET_SHA256[arch]}); download it yourself and set "
                         "model.pretrained to its path")
    return Resource(url, name, sha256=IMAGENET_SHA256[arch])


def mirrored(res: Resource, mirror: str) -> Resource:
    """The same file fetched from ``mirror`` (a base URL serving it under its file name)."""
    return res.with_url(mirror.rstrip("/") + "/" + res.filename) if mirror else res


def fetch_benchmark(benchmark: str, root, mirror: str = "", synthetic=None, workers: int = 2,
                    resources=None, folder=None) -> Path:
    """Download, verify and extract a real benchmark, or generate the synthetic one, into raw/<benchmark>.
    A folder benchmark (``folder``: its data.folder config) is read in place by prepare: raw/folder
    only records where it is and what it holds.

    ``resources`` replaces the official (resource, marker) list, e.g. for a private mirror with
    its own checksums.
    """
    raw = raw_dir(root, check_benchmark(benchmark))
    if benchmark == "folder":
        src = Path(folder.root)
        if not src.is_dir():
            raise FileNotFoundError(f"data.folder.root: {src} is not a folder; point it to your images "
                                    "(layout: pipeline/data/folder.py, docs/own-data.md)")
        files = sorted(p for p in src.rglob("*") if p.is_file())
        raw.mkdir(parents=True, exist_ok=True)
        (raw / "source.json").write_text(json.dumps({"root": folder.root, "files": len(files),
                                                     "bytes": sum(p.stat().st_size for p in files)}, indent=1))
        log.info("folder benchmark: %d files in %s (read in place by prepare)", len(files), src)
        return raw
    if benchmark == "synthetic":
        from .synthetic import generate
        if synthetic is None:
            raise ValueError("the synthetic benchmark needs its data.synthetic parameters")
        tmp = raw.parent / f".{raw.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        counts = generate(tmp, synthetic.num_train, synthetic.num_val, synthetic.image_size, synthetic.seed, workers)
        shutil.rmtree(raw, ignore_errors=True)
        os.replace(tmp, raw)
        log.info("generated the synthetic benchmark (%s) in %s", counts, raw)
        return raw
    if resources is None:
        resources = PASCAL if benchmark == "pascal" else COCO
    for res, marker in resources:
        path = download(mirrored(res, mirror), raw / "archives")
        if marker:
            extract(path, raw, marker)
        else:
            shutil.copyfile(path, raw / res.filename)
    log.info("%s downloaded, verified and extracted in %s", benchmark, raw)
    return raw


def fetch_weights(archs, root, mirror: str = "", resources: dict | None = None) -> dict:
    """Download torchvision's ImageNet checkpoints (sha256-verified) to where the train stage looks."""
    from ..models.backbone import weights_path
    got = {}
    for arch in archs:
        res = (resources or {}).get(arch) or mirrored(backbone_resource(arch), mirror)
        path = download(res, Path(root) / "weights" / "imagenet" / "archives")
        dest = weights_path(root, arch)
        link_or_copy(path, dest)
        got[arch] = {"file": str(dest), "url": res.url, "sha256": res.sha256}
    return got
