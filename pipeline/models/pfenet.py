"""PFENet (Tian et al., TPAMI 2020) on a torchvision ResNet backbone, with SVF fine-tuning regimes.

Eval mode:  model(query[B,3,H,W], support[B,K,3,H,W], support_mask[B,K,H,W]) -> logits[B,2,H,W]
Train mode: the same call returns {"logits": ..., "aux": [per-scale logits]} for ``pfenet_loss``.
The support side (prototype + masked layer4 features) is computed by ``encode_support`` and can be
cached; ``decode`` runs the query side against it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..svf import set_finetune
from .backbone import Backbone

EPS = 1e-7


def _conv(cin, cout, k, relu=True):
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _trains(*modules) -> bool:
    return any(p.requires_grad for m in modules for p in m.parameters())


def _classifier(dim, classes=2):
    return nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                         nn.Dropout2d(p=0.1), nn.Conv2d(dim, classes, 1))


def _resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def masked_average_pool(feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Prototype: sum(feat * mask) / (sum(mask) + 5e-4) over space -> [B, C, 1, 1]."""
    area = mask.sum(dim=(2, 3), keepdim=True) + 5e-4
    return (feat * mask).sum(dim=(2, 3), keepdim=True) / area


def prior_mask(query_feat4: torch.Tensor, support_feat4: torch.Tensor) -> torch.Tensor:
    """Training-free prior: max cosine similarity of each query position to the masked support
    positions, min-max normalised over the query positions, averaged over shots.

    query_feat4 [B,C,h,w]; support_feat4 [B,C,hs,ws] or [B,K,C,hs,ws]. Output [B,1,h,w] in [0,1].
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


class PFENet(nn.Module):
    def __init__(self, backbone: Backbone, reduce_dim: int = 256, bins=(60, 30, 15, 8), classes: int = 2):
        super().__init__()
        self.backbone = backbone
        c2, c3, _ = backbone.channels
        self.bins = list(bins)
        d = reduce_dim
        self.down_query = nn.Sequential(nn.Conv2d(c2 + c3, d, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(0.5))
        self.down_supp = nn.Sequential(nn.Conv2d(c2 + c3, d, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(0.5))
        self.init_merge = nn.ModuleList([_conv(2 * d + 1, d, 1) for _ in self.bins])
        self.alpha_conv = nn.ModuleList([_conv(2 * d, d, 1) for _ in self.bins[1:]])
        self.beta_conv = nn.ModuleList([nn.Sequential(_conv(d, d, 3), _conv(d, d, 3)) for _ in self.bins])
        self.inner_cls = nn.ModuleList([_classifier(d, classes) for _ in self.bins])
        self.res1 = _conv(d * len(self.bins), d, 1)
        self.res2 = nn.Sequential(_conv(d, d, 3), _conv(d, d, 3))
        self.cls = _classifier(d, classes)

    # ----------------------------------------------------------------- backbone
    def _features(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        bb = self.backbone
        # No autograd graph through stages whose parameters are all frozen (every stage in the
        # `frozen` regime, layer0-1 in `svf`): same numbers, less memory and time.
        with torch.set_grad_enabled(torch.is_grad_enabled() and _trains(bb.layer0, bb.layer1)):
            f = bb.layer1(bb.layer0(x))
        with torch.set_grad_enabled(torch.is_grad_enabled() and _trains(bb.layer0, bb.layer1, bb.layer2, bb.layer3, bb.layer4)):
            f2 = bb.layer2(f)
            f3 = bb.layer3(f2)
            if mask is not None:
                f4 = bb.layer4(f3 * _resize(mask, f3.shape[-2:]))
            else:
                f4 = bb.layer4(f3)
        if f2.shape[-2:] != f3.shape[-2:]:
            f2 = _resize(f2, f3.shape[-2:])
        return torch.cat([f3, f2], 1), f4

    def _bin_size(self, b, size: int) -> int:
        return max(1, int(size * b)) if isinstance(b, float) and b <= 1.0 else int(b)

    # ----------------------------------------------------------------- support / query
    def encode_support(self, support: torch.Tensor, support_mask: torch.Tensor):
        """support [B,K,3,H,W], support_mask [B,K,H,W] (1 = object; 0 and 255 = not) ->
        (prototype [B,d,1,1] averaged over shots, masked layer4 features [B,K,C4,h,w])."""
        b, k = support.shape[0], support.shape[1]
        x = support.flatten(0, 1)
        m = (support_mask.flatten(0, 1) == 1).to(x.dtype).unsqueeze(1)
        mid, f4 = self._features(x, m)
        mid = self.down_supp(mid)
        m_small = _resize(m, mid.shape[-2:])
        proto = masked_average_pool(mid, m_small).view(b, k, -1, 1, 1).mean(1)
        f4 = f4 * _resize(m, f4.shape[-2:])
        return proto, f4.view(b, k, *f4.shape[1:])

    def decode(self, query: torch.Tensor, prototype: torch.Tensor, support_feat4: torch.Tensor):
        h, w = query.shape[-2:]
        mid, q4 = self._features(query)
        q = self.down_query(mid)
        prior = _resize(prior_mask(q4, support_feat4), q.shape[-2:])
        fh, fw = q.shape[-2:]
        feats, aux = [], []
        for i, b in enumerate(self.bins):
            size = self._bin_size(b, fh)
            qb = adaptive_pool(q, size)
            sb = prototype.expand(-1, -1, qb.shape[2], qb.shape[3])
            pb = _resize(prior, qb.shape[-2:])
            merged = self.init_merge[i](torch.cat([qb, sb, pb], 1))
            if i >= 1:
                prev = _resize(feats[i - 1], merged.shape[-2:])
                merged = self.alpha_conv[i - 1](torch.cat([merged, prev], 1)) + merged
            merged = self.beta_conv[i](merged) + merged
            aux.append(self.inner_cls[i](merged))
            feats.append(_resize(merged, (fh, fw)))
        q = self.res1(torch.cat(feats, 1))
        q = self.res2(q) + q
        logits = _resize(self.cls(q), (h, w))
        if self.training:
            return {"logits": logits, "aux": [_resize(a, (h, w)) for a in aux], "prior": prior}
        return logits

    def forward(self, query: torch.Tensor, support: torch.Tensor, support_mask: torch.Tensor):
        if support.dim() != 5 or support_mask.dim() != 4 or query.dim() != 4:
            raise ValueError("expected query[B,3,H,W], support[B,K,3,H,W], support_mask[B,K,H,W]; got "
                             f"{tuple(query.shape)}, {tuple(support.shape)}, {tuple(support_mask.shape)}")
        if support.shape[-2:] != support_mask.shape[-2:]:
            raise ValueError(f"support mask size {tuple(support_mask.shape[-2:])} differs from the support "
                             f"image size {tuple(support.shape[-2:])}")
        proto, f4 = self.encode_support(support, support_mask)
        return self.decode(query, proto, f4)


def pfenet_loss(out: dict, target: torch.Tensor, aux_weight: float = 1.0):
    """Cross-entropy (ignore 255) on the final logits + aux_weight x mean of the per-scale losses."""
    target = target.long()
    main = F.cross_entropy(out["logits"].float(), target, ignore_index=255)
    aux = torch.stack([F.cross_entropy(a.float(), target, ignore_index=255) for a in out["aux"]]).mean()
    return main + aux_weight * aux, main, aux


def build_pfenet(backbone: Backbone, finetune: str, reduce_dim: int, bins, form: str = "rebuild"):
    counts = set_finetune(backbone, finetune, form)
    model = PFENet(backbone, reduce_dim, bins)
    counts["head"] = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    return model, counts
