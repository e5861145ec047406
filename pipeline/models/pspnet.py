"""The base learner of BAM: PSPNet (Zhao et al., CVPR 2017) over the fold's base classes.

backbone -> PPM (adaptive average pools at bins 1, 2, 3, 6, each 1x1 conv to C/4 + BN + ReLU,
upsampled and concatenated with the input: 2C channels) -> classifier (3x3 conv to 512, BN, ReLU,
Dropout 0.1, 1x1 conv to 1 + number of base classes). Logits come back at the input size.

Unlike the few-shot heads, this network trains its BatchNorm layers (BAM's train_base.py; SyncBN
under torchrun): ``train()`` puts every BN, the backbone's included, in train mode unless
``train_bn`` is off, which BAM's meta stage does when it reuses the trained learner, frozen.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .backbone import Backbone
from .layers import adaptive_pool, resize

BINS = (1, 2, 3, 6)
HIDDEN = 512


class PPM(nn.Module):
    """Pyramid pooling: [x, up(pool_b(x)) for b in bins] concatenated along channels."""

    def __init__(self, channels: int, bins=BINS):
        super().__init__()
        self.bins = tuple(bins)
        reduced = channels // len(self.bins)
        self.features = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, reduced, 1, bias=False),
                                                    nn.BatchNorm2d(reduced), nn.ReLU(inplace=True))
                                      for _ in self.bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        # adaptive_pool: adaptive_avg_pool2d's numbers, exportable for any input size
        return torch.cat([x] + [resize(f(adaptive_pool(x, b)), size) for b, f in zip(self.bins, self.features)], 1)


class PSPNet(nn.Module):
    def __init__(self, backbone: Backbone, classes: int):
        super().__init__()
        self.backbone, self.classes, self.train_bn = backbone, classes, True
        c4 = backbone.channels[2]
        self.ppm = PPM(c4)
        self.cls = nn.Sequential(nn.Conv2d(2 * c4, HIDDEN, 3, padding=1, bias=False), nn.BatchNorm2d(HIDDEN),
                                 nn.ReLU(inplace=True), nn.Dropout2d(p=0.1), nn.Conv2d(HIDDEN, classes, 1))

    def train(self, mode: bool = True):
        super().train(mode)   # the backbone pins its BN to eval here
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train(mode and self.train_bn)
        return self

    def classify(self, feat4: torch.Tensor) -> torch.Tensor:
        """Logits at layer4's resolution from layer4's features."""
        return self.cls(self.ppm(feat4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        f4 = bb.layer4(bb.layer3(bb.layer2(bb.layer1(bb.layer0(x)))))
        return resize(self.classify(f4), x.shape[-2:])
