"""Pieces the few-shot heads share (PFENet, BAM, the baseline): backbone features, prototypes, the prior
mask, export-friendly adaptive pooling, the small conv blocks the heads are written with, and the ASPP
meta learner BAM and the baseline have in common."""
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


def encode_shots(bb: Backbone, down_supp: nn.Module, support: torch.Tensor, support_mask: torch.Tensor):
    """The support side BAM and the baseline share: support [B,K,3,H,W], support_mask [B,K,H,W] (1 = object)
    -> (prototypes [B,K,d] of down_supp(mid-level) by masked average pooling, masked layer4 features
    [B,K,C4,h,w], (layer2, layer3) of the B*K supports)."""
    b, k = support.shape[0], support.shape[1]
    x = support.flatten(0, 1)
    m = (support_mask.flatten(0, 1) == 1).to(x.dtype).unsqueeze(1)
    f2, f3, f4 = features(bb, x, m)
    mid = down_supp(mid_level(f2, f3))
    proto = masked_average_pool(mid, resize(m, mid.shape[-2:]))
    f4 = f4 * resize(m, f4.shape[-2:])
    return proto.view(b, k, -1), f4.view(b, k, *f4.shape[1:]), (f2, f3)


def at_layer3(f2: torch.Tensor, f3: torch.Tensor) -> torch.Tensor:
    """layer2 resized to layer3's size where they differ (VGG-16, output stride 32), as the authors do."""
    return resize(f2, f3.shape[-2:]) if f2.shape[-2:] != f3.shape[-2:] else f2


def mid_level(f2: torch.Tensor, f3: torch.Tensor) -> torch.Tensor:
    """concat(layer3, layer2 at layer3's size)."""
    return torch.cat([f3, at_layer3(f2, f3)], 1)


class ASPP(nn.Module):
    """Image pooling + 1x1 + 3x3 at dilations 6, 12, 18 (convs with bias, ReLU): 5 x dim channels."""

    def __init__(self, dim: int):
        super().__init__()
        self.image_pool = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU())
        self.branches = nn.ModuleList([nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU())] +
                                      [nn.Sequential(nn.Conv2d(dim, dim, 3, padding=r, dilation=r), nn.ReLU())
                                       for r in (6, 12, 18)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.image_pool(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, x.shape[2], x.shape[3])
        return torch.cat([g] + [b(x) for b in self.branches], 1)


# BAM's meta learner, which is the SVF authors' baseline: concat(query, prototype, prior) -> init_merge -> ASPP
# -> res1 -> res2 (residual) -> cls_meta. Its modules are attributes of the head (the checkpoints' names).
def add_meta_learner(head: nn.Module, d: int, classes: int = 2) -> None:
    head.init_merge = conv_block(2 * d + 1, d, 1)
    head.aspp = ASPP(d)
    head.res1 = conv_block(5 * d, d, 1)
    head.res2 = nn.Sequential(conv_block(d, d, 3), conv_block(d, d, 3))
    head.cls_meta = classifier(d, classes)


def meta_learner(head: nn.Module, q: torch.Tensor, proto: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """q [B,d,h,w], proto [B,d], prior [B,1,h,w] -> the meta learner's logits [B,2,h,w]."""
    merged = head.init_merge(torch.cat([q, proto[:, :, None, None].expand_as(q), prior], 1))
    meta = head.res1(head.aspp(merged))
    return head.cls_meta(head.res2(meta) + meta)
