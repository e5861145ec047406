"""Model construction: ``build_model(cfg)`` is the one entry point."""
from __future__ import annotations

import torch

from .backbone import ARCHS, Backbone, load_backbone, state_fingerprint
from .pfenet import PFENet, build_pfenet, pfenet_loss, prior_mask

HEADS = ("pfenet",)


def build_model(cfg, finetune: str | None = None, pretrained: str | None = None):
    """Build the few-shot model described by ``cfg`` (a Config or its ``model`` section).

    ``finetune`` overrides ``cfg.model.finetune`` (the merge stage builds the dense ``frozen`` form);
    ``pretrained`` overrides where backbone weights come from. Returns (model, parameter counts).
    """
    m = cfg.model if hasattr(cfg, "model") else cfg
    root = cfg.data.root if hasattr(cfg, "data") else "data"
    if m.head not in HEADS:
        raise ValueError(f"unknown head {m.head!r}; choose one of {HEADS}")
    torch.manual_seed(m.init_seed)
    backbone = load_backbone(m.backbone, pretrained or m.pretrained, m.output_stride, m.init_seed, root, m.dilation)
    fingerprint = state_fingerprint(backbone)
    torch.manual_seed(m.init_seed + 1)
    model, counts = build_pfenet(backbone, finetune or m.finetune, m.reduce_dim, m.bins, m.svf_form)
    model.backbone_fingerprint = fingerprint   # the base weights this model starts from
    return model, counts


__all__ = ["ARCHS", "Backbone", "HEADS", "PFENet", "build_model", "load_backbone", "pfenet_loss",
           "prior_mask", "state_fingerprint"]
