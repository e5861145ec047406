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

from ..svf import SVF_STAGES, set_finetune
from .backbone import Backbone
from .layers import adaptive_pool, classifier, conv_block, features, masked_average_pool, mid_level, prior_mask, resize


class PFENet(nn.Module):
    # encode_support's outputs: name -> the axes that are batch / shots (dynamic in exported graphs)
    SUPPORT_FEATURES = {"prototype": {0: "batch"}, "support_feat4": {0: "batch", 1: "shots"}}

    def __init__(self, backbone: Backbone, reduce_dim: int = 256, bins=(60, 30, 15, 8), classes: int = 2):
        super().__init__()
        self.backbone = backbone
        c2, c3, _ = backbone.channels
        self.bins = list(bins)
        d = reduce_dim
        self.down_query = nn.Sequential(nn.Conv2d(c2 + c3, d, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(0.5))
        self.down_supp = nn.Sequential(nn.Conv2d(c2 + c3, d, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(0.5))
        self.init_merge = nn.ModuleList([conv_block(2 * d + 1, d, 1) for _ in self.bins])
        self.alpha_conv = nn.ModuleList([conv_block(2 * d, d, 1) for _ in self.bins[1:]])
        self.beta_conv = nn.ModuleList([nn.Sequential(conv_block(d, d, 3), conv_block(d, d, 3)) for _ in self.bins])
        self.inner_cls = nn.ModuleList([classifier(d, classes) for _ in self.bins])
        self.res1 = conv_block(d * len(self.bins), d, 1)
        self.res2 = nn.Sequential(conv_block(d, d, 3), conv_block(d, d, 3))
        self.cls = classifier(d, classes)

    def _features(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        f2, f3, f4 = features(self.backbone, x, mask)
        return mid_level(f2, f3), f4

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
        m_small = resize(m, mid.shape[-2:])
        proto = masked_average_pool(mid, m_small).view(b, k, -1, 1, 1).mean(1)
        f4 = f4 * resize(m, f4.shape[-2:])
        return proto, f4.view(b, k, *f4.shape[1:])

    def decode(self, query: torch.Tensor, prototype: torch.Tensor, support_feat4: torch.Tensor):
        h, w = query.shape[-2:]
        mid, q4 = self._features(query)
        q = self.down_query(mid)
        prior = resize(prior_mask(q4, support_feat4), q.shape[-2:])
        fh, fw = q.shape[-2:]
        feats, aux = [], []
        for i, b in enumerate(self.bins):
            size = self._bin_size(b, fh)
            qb = adaptive_pool(q, size)
            sb = prototype.expand(-1, -1, qb.shape[2], qb.shape[3])
            pb = resize(prior, qb.shape[-2:])
            merged = self.init_merge[i](torch.cat([qb, sb, pb], 1))
            if i >= 1:
                prev = resize(feats[i - 1], merged.shape[-2:])
                merged = self.alpha_conv[i - 1](torch.cat([merged, prev], 1)) + merged
            merged = self.beta_conv[i](merged) + merged
            aux.append(self.inner_cls[i](merged))
            feats.append(resize(merged, (fh, fw)))
        q = self.res1(torch.cat(feats, 1))
        q = self.res2(q) + q
        logits = resize(self.cls(q), (h, w))
        if self.training:
            return {"logits": logits, "aux": [resize(a, (h, w)) for a in aux], "prior": prior}
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
    """Cross-entropy (ignore 255) on the final logits + aux_weight x mean of the per-scale losses.
    Returns (total, {"main_loss", "aux_loss"})."""
    target = target.long()
    main = F.cross_entropy(out["logits"].float(), target, ignore_index=255)
    aux = torch.stack([F.cross_entropy(a.float(), target, ignore_index=255) for a in out["aux"]]).mean()
    return main + aux_weight * aux, {"main_loss": main, "aux_loss": aux}


def build_pfenet(backbone: Backbone, finetune: str, reduce_dim: int, bins, form: str = "rebuild",
                 stages=SVF_STAGES, rank: str = "full"):
    counts = set_finetune(backbone, finetune, form, stages, rank)
    model = PFENet(backbone, reduce_dim, bins)
    counts["head"] = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
    return model, counts
