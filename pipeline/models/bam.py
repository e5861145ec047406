"""BAM (Lang et al., CVPR 2022): a meta learner and a frozen base learner, ensembled by scene difference.

Eval mode:  model(query[B,3,H,W], support[B,K,3,H,W], support_mask[B,K,H,W]) -> logits[B,2,H,W]
Train mode: model(..., base_class=[B]) returns {"logits", "meta", "base"} for ``bam_loss``;
``base_class`` (1..N, the episode's class in the base learner's numbering) is left out of the base
map, as BAM's training does; at test every base class counts.

Meta learner: PFENet's single-scale merge (down_query/down_supp over concat(layer3, layer2), the
prototype by masked average pooling, the prior mask on layer4) -> ASPP -> res1 -> res2 -> cls_meta.
Scene difference: est = ||G_q - G_s||_F / C over the normalised Gram matrices of layer2. For shot > 1
the distances are sorted, reweighted by kshot_rw (1x1 convs shot -> 2 -> shot), put back in order and
softmax-ed; the weights apply to est, the priors and the prototypes (shot 1: weight 1). A model
trained with one shot and given K supports weights them equally (BAM has no rule for that case).
Ensemble: gram_merge (initialised [1, 0]) adjusts the meta background and foreground by est;
cls_merge (initialised [1, 0]) merges the adjusted background with the base map (the base learner's
foreground probability summed over its classes); output [merged background, adjusted foreground].

SVF as the SVF authors apply it to BAM: the regimes act on the meta branch's backbone, a copy of the
base learner's; the base branch stays dense and frozen. In the `frozen` regime both are one module,
so the query crosses the backbone once; in `svf` and `full` twice (base branch without autograd).
The support side (per-shot prototypes, masked layer4 features, Gram matrices) is ``encode_support``
and can be cached; ``decode`` runs the query side against it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import Backbone
from .layers import add_meta_learner, at_layer3, encode_shots, features, meta_learner, mid_level, prior_mask, resize
from .pspnet import PSPNet

EPS = 1e-7


def gram_matrix(feat: torch.Tensor) -> torch.Tensor:
    """[N,C,h,w] -> [N,C,C]: channel correlations divided by the product of the channels' norms."""
    f = feat.flatten(2)
    norm = f.norm(dim=2, keepdim=True)
    return torch.bmm(f, f.transpose(1, 2)) / (torch.bmm(norm, norm.transpose(1, 2)) + EPS)


def _merge_conv() -> nn.Conv2d:
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
    return conv


class BAM(nn.Module):
    # encode_support's outputs: name -> the axes that are batch / shots (dynamic in exported graphs)
    SUPPORT_FEATURES = {"prototype": {0: "batch", 1: "shots"}, "support_feat4": {0: "batch", 1: "shots"},
                        "support_gram": {0: "batch", 1: "shots"}}

    def __init__(self, backbone: Backbone, base: PSPNet, shots: int = 1, reduce_dim: int = 256,
                 kshot_dim: int = 2, classes: int = 2):
        super().__init__()
        self.backbone, self.base, self.shots = backbone, base, shots
        base.train_bn = False
        for p in base.parameters():
            p.requires_grad_(False)
        c2, c3, _ = backbone.channels
        d = reduce_dim
        self.down_query = nn.Sequential(nn.Conv2d(c2 + c3, d, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(0.5))
        self.down_supp = nn.Sequential(nn.Conv2d(c2 + c3, d, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(0.5))
        add_meta_learner(self, d, classes)
        self.gram_merge = _merge_conv()
        self.cls_merge = _merge_conv()
        self.kshot_rw = (nn.Sequential(nn.Conv2d(shots, kshot_dim, 1), nn.ReLU(inplace=True),
                                       nn.Conv2d(kshot_dim, shots, 1)) if shots > 1 else None)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():   # BAM's fix_bn: every BatchNorm stays in eval mode, the base learner's too
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    @property
    def fixed_shots(self) -> int | None:
        """The one shot count the model takes (its k-shot reweighting has K inputs), or None (1-shot: any)."""
        return self.shots if self.kshot_rw is not None else None

    @property
    def shared_backbone(self) -> bool:
        return self.base.backbone is self.backbone

    # ----------------------------------------------------------------- support / query
    def encode_support(self, support: torch.Tensor, support_mask: torch.Tensor):
        """support [B,K,3,H,W], support_mask [B,K,H,W] (1 = object) -> (prototypes [B,K,d],
        masked layer4 features [B,K,C4,h,w], layer2 Gram matrices [B,K,C2,C2])."""
        proto, f4, (f2, f3) = encode_shots(self.backbone, self.down_supp, support, support_mask)
        gram = gram_matrix(at_layer3(f2, f3))
        return proto, f4, gram.view(*proto.shape[:2], *gram.shape[1:])

    def shot_weights(self, est: torch.Tensor) -> torch.Tensor:
        """[B,K] scene differences -> [B,K] weights summing to 1 (kshot_rw; equal without it)."""
        if self.kshot_rw is None:
            return torch.softmax(torch.zeros_like(est), 1)
        if est.shape[1] != self.shots:
            raise ValueError(f"this BAM model was trained with {self.shots} shots and reweights exactly that many; "
                             f"got {est.shape[1]} supports")
        val, idx = est.sort(1)
        w = self.kshot_rw(val[:, :, None, None])[:, :, 0, 0]
        return torch.softmax(w.gather(1, idx.argsort(1)), 1)

    def base_features(self, query: torch.Tensor, q4: torch.Tensor) -> torch.Tensor:
        """The base learner's layer4 features of the query (the meta branch's when the backbone is shared)."""
        if self.shared_backbone:
            return q4
        with torch.no_grad():
            return features(self.base.backbone, query)[2]

    def decode(self, query: torch.Tensor, prototypes: torch.Tensor, support_feat4: torch.Tensor,
               support_gram: torch.Tensor, base_class: torch.Tensor | None = None):
        h, w = query.shape[-2:]
        f2, f3, q4 = features(self.backbone, query)
        q = self.down_query(mid_level(f2, f3))
        b, c2 = f2.shape[:2]
        est = (gram_matrix(at_layer3(f2, f3)).unsqueeze(1) - support_gram).flatten(2).norm(dim=2) / c2   # B, K
        weights = self.shot_weights(est)
        est = (weights * est).sum(1)
        prior = resize(prior_mask(q4, support_feat4, per_shot=True), q.shape[-2:])
        prior = (weights[:, :, None, None] * prior).sum(1, keepdim=True)
        proto = (weights[:, :, None] * prototypes).sum(1)
        meta = meta_learner(self, q, proto, prior)
        base = self.base.classify(self.base_features(query, q4))

        meta_p, base_p = meta.softmax(1), base.softmax(1)
        keep = torch.ones(b, base_p.shape[1], device=base_p.device, dtype=base_p.dtype)
        keep[:, 0] = 0
        if self.training and base_class is not None:   # the episode's own class is not "base" in training
            keep = keep.scatter(1, base_class.view(b, 1).long(), 0.0)
        base_map = (base_p * keep[:, :, None, None]).sum(1, keepdim=True)
        est_map = est.view(b, 1, 1, 1).expand_as(meta_p[:, :1])
        bg = self.gram_merge(torch.cat([meta_p[:, :1], est_map], 1))
        fg = self.gram_merge(torch.cat([meta_p[:, 1:], est_map], 1))
        final = torch.cat([self.cls_merge(torch.cat([bg, base_map], 1)), fg], 1)
        final = resize(final, (h, w))
        if self.training:
            return {"logits": final, "meta": resize(meta, (h, w)), "base": resize(base, (h, w))}
        return final

    def forward(self, query: torch.Tensor, support: torch.Tensor, support_mask: torch.Tensor,
                base_class: torch.Tensor | None = None):
        if support.dim() != 5 or support_mask.dim() != 4 or query.dim() != 4:
            raise ValueError("expected query[B,3,H,W], support[B,K,3,H,W], support_mask[B,K,H,W]; got "
                             f"{tuple(query.shape)}, {tuple(support.shape)}, {tuple(support_mask.shape)}")
        return self.decode(query, *self.encode_support(support, support_mask), base_class=base_class)


def bam_loss(out: dict, target: torch.Tensor, base_target: torch.Tensor, aux_weight: float = 1.0):
    """CE(final) + aux_weight x (CE(meta) + CE(base vs the base-class label)); the base term has no
    gradient (the base learner is frozen) and is kept for the record, as BAM's loss carries it."""
    main = F.cross_entropy(out["logits"].float(), target.long(), ignore_index=255)
    meta = F.cross_entropy(out["meta"].float(), target.long(), ignore_index=255)
    base = F.cross_entropy(out["base"].float(), base_target.long(), ignore_index=255)
    return main + aux_weight * (meta + base), {"main_loss": main, "aux_loss": meta, "base_loss": base}
