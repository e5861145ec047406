"""Model construction: ``build_model(cfg)`` is the one entry point."""
from __future__ import annotations

import copy

import torch

from ..svf import set_finetune
from .backbone import ARCHS, Backbone, load_backbone, state_fingerprint
from .bam import BAM, bam_loss
from .baseline import Baseline, baseline_loss, build_baseline
from .pfenet import PFENet, build_pfenet, pfenet_loss, prior_mask
from .pspnet import PSPNet

HEADS = ("pfenet", "bam", "baseline")


def base_learner(m, classes: int, state: dict | None = None, pretrained: str = "none", root="data") -> PSPNet:
    """BAM's base learner (PSPNet over ``classes`` outputs: background + base classes) on the backbone
    ``m`` (the config's model section) describes; ``state`` is a trained learner's state_dict."""
    torch.manual_seed(m.init_seed)
    backbone = load_backbone(m.backbone, pretrained, m.output_stride, m.init_seed, root, m.dilation)
    torch.manual_seed(m.init_seed + 2)
    net = PSPNet(backbone, classes)
    if state is not None:
        net.load_state_dict(state, strict=True)
    return net


def build_model(cfg, finetune: str | None = None, pretrained: str | None = None, base: dict | None = None,
                shots: int = 1):
    """Build the few-shot model described by ``cfg`` (a Config or its ``model`` section).

    ``finetune`` overrides ``cfg.model.finetune`` (the merge stage builds the dense ``frozen`` form);
    ``pretrained`` overrides where backbone weights come from. BAM also needs ``base``, the fold's
    base learner checkpoint (pipeline/base.py ``read_base``; ``{"classes": n}`` alone builds an empty
    one for a full state_dict to fill), and ``shots``, the shot count it trains for (its k-shot
    reweighting has one input per shot). Returns (model, parameter counts).
    """
    m = cfg.model if hasattr(cfg, "model") else cfg
    root = cfg.data.root if hasattr(cfg, "data") else "data"
    if m.head not in HEADS:
        raise ValueError(f"unknown head {m.head!r}; choose one of {HEADS}")
    regime = finetune or m.finetune
    if m.head == "bam":
        if base is None:
            raise ValueError("model.head: bam needs the fold's base learner (models/fold<i>/base/base.pt); run the "
                             "base stage first: `dvc repro base@<fold>`")
        learner = base_learner(m, base["classes"], base.get("state"))
        # The SVF authors' BAM: the regime acts on a copy of the base learner's backbone; in `frozen` one
        # module serves both branches (the trained regime decides, so a merged svf model keeps two).
        backbone = learner.backbone if m.finetune == "frozen" else copy.deepcopy(learner.backbone)
        counts = set_finetune(backbone, regime, m.svf_form, m.svf_stages, m.svf_rank)
        torch.manual_seed(m.init_seed + 1)
        model = BAM(backbone, learner, shots, m.reduce_dim)
        counts["head"] = sum(p.numel() for n, p in model.named_parameters()
                             if not n.startswith(("backbone.", "base.")))
        counts["base"] = sum(p.numel() for p in learner.parameters())
        model.backbone_fingerprint = base.get("fingerprint", "")   # the base learner it starts from
        return model, counts
    torch.manual_seed(m.init_seed)
    backbone = load_backbone(m.backbone, pretrained or m.pretrained, m.output_stride, m.init_seed, root, m.dilation)
    fingerprint = state_fingerprint(backbone)
    torch.manual_seed(m.init_seed + 1)
    if m.head == "baseline":
        model, counts = build_baseline(backbone, regime, m.reduce_dim, shots, m.baseline_quirks, m.svf_form,
                                       m.svf_stages, m.svf_rank)
        model.backbone_fingerprint = fingerprint
        return model, counts
    model, counts = build_pfenet(backbone, regime, m.reduce_dim, m.bins, m.svf_form, m.svf_stages, m.svf_rank)
    model.backbone_fingerprint = fingerprint   # the base weights this model starts from
    return model, counts


def fixed_shots(model) -> int | None:
    """The one shot count a model accepts (BAM trained with shot > 1: its reweighting has K inputs; the
    baseline with the authors' summed shots), or None when any count works."""
    return getattr(getattr(model, "module", model), "fixed_shots", None)


def accepts_shots(model, k: int) -> bool:
    return fixed_shots(model) in (None, k)


def head_loss(model, out, batch: dict, aux_weight: float = 1.0):
    """The loss of ``model``'s head on one batch: (total, {name: part})."""
    model = getattr(model, "module", model)
    if isinstance(model, BAM):
        return bam_loss(out, batch["query_mask"], batch["query_base"], aux_weight)
    if isinstance(model, Baseline):
        return baseline_loss(out, batch["query_mask"])
    return pfenet_loss(out, batch["query_mask"], aux_weight)


def train_inputs(model, batch: dict) -> dict:
    """Keyword inputs a head takes in training besides (query, support, support_mask)."""
    return {"base_class": batch["base_class"]} if isinstance(getattr(model, "module", model), BAM) else {}


__all__ = ["ARCHS", "BAM", "Backbone", "Baseline", "HEADS", "PFENet", "PSPNet", "accepts_shots", "bam_loss", "base_learner", "baseline_loss",
           "build_model", "fixed_shots",
           "head_loss", "load_backbone", "pfenet_loss", "prior_mask", "state_fingerprint", "train_inputs"]
