"""The SVF paper's "baseline" head: the SVF authors' model/aspp.py, BAM's meta learner alone.

Eval mode:  model(query[B,3,H,W], support[B,K,3,H,W], support_mask[B,K,H,W]) -> logits[B,2,H,W]
Train mode: the same call returns {"logits": ...} for ``baseline_loss`` (cross-entropy on the logits,
no auxiliary loss: train_aspp.py uses only the meta output's).

Query and support: down_query / down_supp over concat(layer3, layer2 at layer3's size), the support's
prototype by masked average pooling, the prior mask on layer4 (as PFENet and BAM); then init_merge ->
ASPP -> res1 -> res2 -> cls_meta (models/layers.py ``meta_learner``), upsampled to the input. No base
learner, no Gram matrices, no ensemble.

Two quirks of the authors' code change results; ``quirks`` (``model.baseline_quirks``) chooses:
  * ``authors``: as aspp.py trains. Its get_optim leaves ``down_query`` out of the SGD groups, so the query's
    1x1 reduction keeps its random initialisation (here: ``requires_grad`` off); and with K shots the
    prototypes and the priors are summed (its ``weight_soft`` is all ones), so their scale grows with K:
    a model takes exactly the shot count it was trained with.
  * ``fixed``: ``down_query`` trains, and the shots are averaged, like PFENet's, so any K works.
The presets use ``authors``: the paper's baseline rows were trained that way.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..svf import SVF_STAGES, set_finetune
from .backbone import Backbone
from .layers import add_meta_learner, encode_shots, features, meta_learner, mid_level, prior_mask, resize

QUIRKS = ("authors", "fixed")


class Baseline(nn.Module):
    # encode_support's outputs: name -> the axes that are batch / shots (dynamic in exported graphs)
    SUPPORT_FEATURES = {"prototype": {0: "batch", 1: "shots"}, "support_feat4": {0: "batch", 1: "shots"}}

    def __init__(self, backbone: Backbone, shots: int = 1, reduce_dim: int = 256, quirks: str = "authors",
                 classes: int = 2):
        super().__init__()
        if quirks not in QUIRKS:
            raise ValueError(f"model.baseline_quirks: {quirks!r} is not one of {list(QUIRKS)}")
        self.backbone, self.shots, self.quirks = backbone, shots, quirks
        c2, c3, _ = backbone.channels
        d = reduce_dim
        self.down_query = nn.Sequential(nn.Conv2d(c2 + c3, d, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(0.5))
        self.down_supp = nn.Sequential(nn.Conv2d(c2 + c3, d, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(0.5))
        add_meta_learner(self, d, classes)
        if quirks == "authors":
            self.down_query.requires_grad_(False)

    @property
    def fixed_shots(self) -> int | None:
        """The one shot count the model takes (summed shots), or None (averaged: any)."""
        return self.shots if self.quirks == "authors" else None

    def encode_support(self, support: torch.Tensor, support_mask: torch.Tensor):
        """support [B,K,3,H,W], support_mask [B,K,H,W] (1 = object) -> (prototypes [B,K,d], masked layer4
        features [B,K,C4,h,w])."""
        proto, f4, _ = encode_shots(self.backbone, self.down_supp, support, support_mask)
        return proto, f4

    def decode(self, query: torch.Tensor, prototypes: torch.Tensor, support_feat4: torch.Tensor):
        h, w = query.shape[-2:]
        f2, f3, q4 = features(self.backbone, query)
        q = self.down_query(mid_level(f2, f3))
        prior = resize(prior_mask(q4, support_feat4, per_shot=True), q.shape[-2:])     # B, K, h, w
        combine = torch.sum if self.quirks == "authors" else torch.mean
        meta = meta_learner(self, q, combine(prototypes, 1), combine(prior, 1, keepdim=True))
        logits = resize(meta, (h, w))
        return {"logits": logits} if self.training else logits

    def forward(self, query: torch.Tensor, support: torch.Tensor, support_mask: torch.Tensor):
        if support.dim() != 5 or support_mask.dim() != 4 or query.dim() != 4:
            raise ValueError("expected query[B,3,H,W], support[B,K,3,H,W], support_mask[B,K,H,W]; got "
                             f"{tuple(query.shape)}, {tuple(support.shape)}, {tuple(support_mask.shape)}")
        if self.fixed_shots is not None and support.shape[1] != self.fixed_shots:
            raise ValueError(f"this baseline model (model.baseline_quirks: authors) sums its shots and was trained "
                             f"with {self.fixed_shots}; got {support.shape[1]} supports")
        return self.decode(query, *self.encode_support(support, support_mask))


def baseline_loss(out: dict, target: torch.Tensor, aux_weight: float = 1.0):
    """Cross-entropy (ignore 255) on the logits; ``aux_weight`` unused (train_aspp.py has no auxiliary loss)."""
    main = F.cross_entropy(out["logits"].float(), target.long(), ignore_index=255)
    return main, {"main_loss": main}


def build_baseline(backbone: Backbone, finetune: str, reduce_dim: int, shots: int = 1, quirks: str = "authors",
                   form: str = "rebuild", stages=SVF_STAGES, rank: str = "full"):
    counts = set_finetune(backbone, finetune, form, stages, rank)
    model = Baseline(backbone, shots, reduce_dim, quirks)
    counts["head"] = sum(p.numel() for n, p in model.named_parameters()
                         if not n.startswith("backbone.") and p.requires_grad)
    return model, counts
