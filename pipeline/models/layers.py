"""Pieces the few-shot heads share (PFENet, BAM): backbone features, prototypes, the prior mask,
export-friendly adaptive pooling, and the small conv blocks both heads are written with."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import Backbone

EPS = 1e-7


def conv_block(cin, cout, k, relu=True):
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def trains(*modules) -> bool:
    return any(p.requires_grad for m in modules for p in m.parameters())


def classifier(dim, classes=2):
    return nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                         nn.Dropout2d(p=0.1), nn.Conv2d(dim, classes, 1))


def resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def masked_average_pool(feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Prototype: sum(feat * mask) / (sum(mask) + 5e-4) over space -> [B, C, 1, 1]."""
    area = mask.sum(dim=(2, 3), keepdim=True) + 5e-4
    return (feat * mask).sum(dim=(2, 3), keepdim=True) / area


def prior_mask(query_feat4: torch.Tensor, support_feat4: torch.Tensor, per_shot: bool = False) -> torch.Tensor:
    """Training-free prior: max cosine similarity of each query position to the masked support
    positions, min-max normalised over the query positions, averaged over shots.

    query_feat4 [B,C,h,w]; support_feat4 [B,C,hs,ws] or [B,K,C,hs,ws]. Output [B,1,h,w] in [0,1]
    ([B,K,h,w] with ``per_shot``, which BAM weights by its k-shot reweighting).
    Vectorised over shots, so an exported graph keeps K dynamic.
    """
    if support_feat4.dim() == 4:
        support_feat4 = support_feat4.unsqueeze(1)
    b, c, h, w = query_feat4.shape
    q = query_feat4.flatten(2)                              # B, C, hw
    s = support_feat4.flatten(3)                            # B, K, C, hw_s
    q = q / (q.norm(dim=1, keepdim=True) + EPS)
    s = s / (s.norm(dim=2, keepdim=True) + EPS)
    sim = torch.einsum("bcq,bkcs->bkqs", q, s)             # B, K, hw, hw_s
    sim = sim.max(dim=3).values                             # B, K, hw
    lo = sim.min(dim=2, keepdim=True).values
    hi = sim.max(dim=2, keepdim=True).values
    sim = (sim - lo) / (hi - lo + EPS)
    if per_shot:
        return sim.view(b, -1, h, w)
    return sim.mean(dim=1).view(b, 1, h, w)


def _pool_matrix(n_in: int, n_out: int, device, dtype) -> torch.Tensor:
    """Rows average the windows [floor(i*n/m), ceil((i+1)*n/m)) exactly as adaptive_avg_pool does."""
    m = torch.zeros(n_out, n_in, device=device, dtype=dtype)
    for i in range(n_out):
        a, b = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, a:b] = 1.0 / (b - a)
    return m


def adaptive_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """adaptive_avg_pool2d(x, size) as two small matmuls: identical numbers, and it exports to ONNX
    and TensorRT for any input/output ratio (PFENet's bin 8 of a 60x60 map does not divide)."""
    ph = _pool_matrix(x.shape[-2], size, x.device, x.dtype)
    pw = _pool_matrix(x.shape[-1], size, x.device, x.dtype)
    return torch.einsum("ih,bchw,jw->bcij", ph, x, pw)




def features(bb: Backbone, x: torch.Tensor, mask: torch.Tensor | None = None):
    """(layer2, layer3, layer4) features of ``x``; with ``mask`` layer4 sees layer3 x mask (the support
    side of PFENet and BAM). No autograd graph through stages whose parameters are all frozen (every
    stage in the `frozen` regime, layer0-1 in `svf`): same numbers, less memory and time."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and trains(bb.layer0, bb.layer1)):
        f = bb.layer1(bb.layer0(x))
    with torch.set_grad_enabled(torch.is_grad_enabled() and trains(bb.layer0, bb.layer1, bb.layer2, bb.layer3, bb.layer4)):
        f2 = bb.layer2(f)
        f3 = bb.layer3(f2)
        f4 = bb.layer4(f3 * resize(mask, f3.shape[-2:]) if mask is not None else f3)
    return f2, f3, f4


def mid_level(f2: torch.Tensor, f3: torch.Tensor) -> torch.Tensor:
    """concat(layer3, layer2), layer2 resized to layer3's size where they differ (output stride 32)."""
    if f2.shape[-2:] != f3.shape[-2:]:
        f2 = resize(f2, f3.shape[-2:])
    return torch.cat([f3, f2], 1)
