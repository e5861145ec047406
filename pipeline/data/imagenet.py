"""torchvision's ImageNet checkpoints of the ResNet backbones: their full sha256 and their verified download
(the `weights` stage). VGG-16 and the deep-stem ResNets come from ``model.pretrained`` (docs/paper.md)."""
from __future__ import annotations

from pathlib import Path

from .download import Resource, download, link_or_copy, mirrored

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
