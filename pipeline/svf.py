"""Singular Value Fine-tuning (SVF): the method, small and exact.

Every ``nn.Conv2d`` weight ``W`` of shape (out, in/groups, kh, kw) is viewed per group as a matrix
(out_g, in_g*kh*kw) and decomposed in float64 as ``W = U diag(S) V^T`` with full rank
``r = min(out_g, in_g*kh*kw)``. ``U`` and ``V`` are frozen buffers; only ``S`` is a parameter.
Folding back (``to_conv`` / ``merge_svf``) gives a plain dense conv of the original shape.

Forward form. Two equivalent forms exist:
  * ``rebuild``: W = U diag(S) V^T is rebuilt from the factors on every call, then one dense conv;
  * ``factorised``: conv_V (kh x kw, in -> r) -> scale channels by S -> conv_U (1x1, r -> out).
``benchmarks/svf_forms.py`` measures both (training step = forward + backward + SGD step of
layer2-4 of a ResNet-50 in the `svf` regime; 2-core CPU):
  * 473 x 473, batch 2 (the protocol's crop): rebuild 4.36 s, factorised 4.72 s -> rebuild 1.08x faster;
    inference unmerged/merged: rebuild 1.04x, factorised 1.19x;
  * 128 x 128, batch 4 (the synthetic default): rebuild 0.72 s, factorised 0.47 s -> factorised 1.54x faster;
  * H100, deep-stem ResNet-50, 473 x 473, batch 8: rebuild 38.8 ms, factorised 37.1 ms (even); inference
    unmerged/merged: rebuild 1.04x, factorised 1.12x; the whole PFENet step in float32 needs 13.1 GiB
    with rebuild, 18.2 with factorised (benchmarks/train_step.py).
Rebuilding costs one matmul per layer whatever the batch and image size; the factorised form pays
an extra 1x1 conv over every pixel of an r-channel map. So ``rebuild`` wins once a step carries
many pixels (the real recipes: 473/641 px crops, batch 8) and is the default; at tiny CPU images
the factorised form wins and ``model.svf_form: factorised`` selects it. Both are tested equal.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMS = ("rebuild", "factorised")
REGIMES = ("frozen", "svf", "full")
STAGES = ("layer0", "layer1", "layer2", "layer3", "layer4")
SVF_STAGES = ("layer2", "layer3", "layer4")   # model.svf_stages' default: the paper's
RANKS = ("full", "authors")
# model.svf_rank. full: every singular value kept (the factorisation is exact). authors: the SVF authors'
# svf.resolver, which factorises every conv of layer0..layer4 (S trains only in model.svf_stages) at rank
# floor(min(out, in*kh*kw) / 4) * 4: ResNet-50's and VGG-16's first conv (3 -> 64, 3x3: 27) keeps 24, so
# the stem is not the dense one; every other conv of both backbones keeps its full rank.


class SVFConv2d(nn.Module):
    """A Conv2d re-parameterised as U diag(S) V^T with only S trainable."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation,
                 groups: int, rank: int, bias: bool, dtype=torch.float32, form: str = "rebuild"):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"unknown SVF forward form {form!r}; choose one of {FORMS}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation = tuple(stride), padding, tuple(dilation)
        self.groups, self.rank, self.form = groups, rank, form
        kh, kw = self.kernel_size
        out_g, in_g = out_channels // groups, in_channels // groups
        self.register_buffer("U", torch.zeros(groups, out_g, rank, dtype=dtype))
        self.register_buffer("Vh", torch.zeros(groups, rank, in_g * kh * kw, dtype=dtype))
        self.S = nn.Parameter(torch.zeros(groups * rank, dtype=dtype))
        if bias:
            self.register_buffer("bias", torch.zeros(out_channels, dtype=dtype))
        else:
            self.bias = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, form: str = "rebuild", rank: str = "full") -> "SVFConv2d":
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"SVFConv2d.from_conv takes an nn.Conv2d, got {type(conv).__name__}; "
                            "accepted: torch.nn.Conv2d (any groups, zero padding mode)")
        if conv.padding_mode != "zeros":
            raise ValueError(f"SVFConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        w = conv.weight.detach()
        out_c, in_g, kh, kw = w.shape
        g = conv.groups
        out_g = out_c // g
        mats = w.to(torch.float64).reshape(g, out_g, in_g * kh * kw)
        # One SVD per group (batched); grouped and depthwise convs are exact this way.
        U, S, Vh = torch.linalg.svd(mats, full_matrices=False)
        r = S.shape[-1] if rank == "full" else max(1, S.shape[-1] // 4 * 4)   # RANKS
        U, S, Vh = U[..., :r], S[..., :r], Vh[..., :r, :]
        m = cls(conv.in_channels, out_c, (kh, kw), conv.stride, conv.padding, conv.dilation, g, r,
                conv.bias is not None, dtype=w.dtype, form=form).to(w.device)
        with torch.no_grad():
            m.U.copy_(U.to(w.dtype))
            m.Vh.copy_(Vh.to(w.dtype))
            m.S.copy_(S.reshape(-1).to(w.dtype))
            if conv.bias is not None:
                m.bias.copy_(conv.bias.detach())
        m.S.requires_grad_(conv.weight.requires_grad)
        return m

    def dense_weight(self) -> torch.Tensor:
        """W = U diag(S) V^T in the conv's shape (out, in/groups, kh, kw)."""
        g, r = self.groups, self.rank
        w = torch.matmul(self.U * self.S.view(g, 1, r), self.Vh)
        return w.reshape(self.out_channels, self.in_channels // g, *self.kernel_size)

    def to_conv(self) -> nn.Conv2d:
        """A plain nn.Conv2d carrying the folded weight (in float64, stored in the module dtype)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=self.bias is not None,
                         device=self.S.device, dtype=self.S.dtype)
        g, r = self.groups, self.rank
        with torch.no_grad():
            w64 = torch.matmul(self.U.double() * self.S.detach().double().view(g, 1, r), self.Vh.double())
            conv.weight.copy_(w64.reshape_as(conv.weight).to(conv.weight.dtype))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.weight.requires_grad_(False)
        if conv.bias is not None:
            conv.bias.requires_grad_(False)
        return conv

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "rebuild":
            return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        g, r = self.groups, self.rank
        in_g = self.in_channels // g
        v = self.Vh.reshape(g * r, in_g, *self.kernel_size)
        y = F.conv2d(x, v, None, self.stride, self.padding, self.dilation, g)
        y = y * self.S.view(1, -1, 1, 1)
        u = self.U.reshape(self.out_channels, r, 1, 1)
        return F.conv2d(y, u, self.bias, 1, 0, 1, g)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, rank={self.rank}, "
                f"form={self.form}")


def _replace_children(module: nn.Module, kind, convert) -> int:
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, kind):
            setattr(module, name, convert(child))
            n += 1
        else:
            n += _replace_children(child, kind, convert)
    return n


def _check_module(module) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")


def apply_svf(module: nn.Module, form: str = "rebuild", rank: str = "full") -> nn.Module:
    """Replace every nn.Conv2d inside ``module`` by an SVFConv2d, in place; returns ``module``.

    A bare Conv2d cannot be replaced in place by its own container: it is converted and returned.
    """
    _check_module(module)
    if isinstance(module, nn.Conv2d):
        return SVFConv2d.from_conv(module, form, rank)
    _replace_children(module, nn.Conv2d, lambda c: SVFConv2d.from_conv(c, form, rank))
    return module


def merge_svf(module: nn.Module) -> nn.Module:
    """Replace every SVFConv2d inside ``module`` by its dense nn.Conv2d, in place; returns ``module``."""
    _check_module(module)
    if isinstance(module, SVFConv2d):
        return module.to_conv()
    _replace_children(module, SVFConv2d, lambda m: m.to_conv())
    return module


def count_params(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def set_finetune(backbone: nn.Module, regime: str, form: str = "rebuild", stages=SVF_STAGES,
                 rank: str = "full") -> dict:
    """Set one of the paper's three fine-tune regimes on a backbone exposing layer0..layer4.

    * ``frozen``: nothing in the backbone trains;
    * ``svf``: the convs of ``stages`` (model.svf_stages; the paper's layer2-4) become SVFConv2d and only
      their S trains; the other stages and every BatchNorm stay frozen (``rank``: RANKS);
    * ``full``: every weight of the same ``stages`` trains, so svf and full differ in how, not where.
    BatchNorm running statistics stay in eval mode in every regime (the backbone's ``train()``
    keeps them there). Returns the trainable and total parameter counts.
    """
    if regime not in REGIMES:
        raise ValueError(f"unknown fine-tune regime {regime!r}; choose one of {REGIMES}")
    if rank not in RANKS:
        raise ValueError(f"model.svf_rank: {rank!r} is not one of {list(RANKS)}")
    missing = [s for s in STAGES if not hasattr(backbone, s)]
    if missing:
        raise ValueError(f"backbone lacks stages {missing}; set_finetune expects layer0..layer4")
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"model.svf_stages: {list(stages)} names {unknown or 'no stage'}; the backbone's stages are "
                         f"{list(STAGES)}")
    total = count_params(backbone.parameters())  # dense count, before any factorisation
    for p in backbone.parameters():
        p.requires_grad_(False)
    if regime == "full":
        for stage in stages:
            for p in getattr(backbone, stage).parameters():
                p.requires_grad_(True)
    if regime == "svf":
        for stage in (STAGES if rank == "authors" else stages):
            apply_svf(getattr(backbone, stage), form, rank)
        for stage in stages:
            for m in getattr(backbone, stage).modules():
                if isinstance(m, SVFConv2d):
                    m.S.requires_grad_(True)
    trainable = count_params(p for p in backbone.parameters() if p.requires_grad)
    return {"regime": regime, "trainable": trainable, "total": total}


def singular_values(module: nn.Module) -> dict[str, torch.Tensor]:
    """The S vector of every SVFConv2d in ``module``, keyed like the module's state_dict."""
    return {f"{name}.S": m.S.detach().clone() for name, m in module.named_modules() if isinstance(m, SVFConv2d)}
