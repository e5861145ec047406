"""Where the real benchmarks and backbone weights come from (official URLs and checksums)."""
from __future__ import annotations

from .download import Resource

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


def backbone_resource(arch: str) -> Resource:
    """torchvision's ImageNet checkpoint for ``arch``; its file name carries a sha256 prefix."""
    import torchvision

    from ..models.backbone import WEIGHT_ENUMS
    url = getattr(torchvision.models, WEIGHT_ENUMS[arch]).IMAGENET1K_V1.url
    name = url.rsplit("/", 1)[-1]
    return Resource(url, name, sha256=name.rsplit("-", 1)[-1].split(".")[0])
