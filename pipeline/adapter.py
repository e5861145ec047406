"""The artifacts training produces, their formats and their checks.

The adapter holds the head's weights, the backbone's singular values (``svf``; the whole backbone
for ``full``, nothing for ``frozen``), the config, and the sha256 of the base weights it was trained
from: the ImageNet/synthetic backbone for PFENet, the whole base learner for BAM (whose weights are
not in the adapter: they live in the fold's ``base.pt``). Base weights + adapter rebuild the trained
model exactly. ``base.pt`` is BAM's base learner; ``merged.pt`` the dense deployable model.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import config_from_dict
from .data.benchmarks import require
from .models import build_model

FORMAT = "svf-fss-adapter/1"
BASE_FORMAT = "svf-fss-base/1"


def adapter_state(model, cfg, extra: dict | None = None, regime: str | None = None) -> dict:
    """``regime`` (default model.finetune) decides what of the backbone is kept; a released model keeps it whole."""
    model = getattr(model, "module", model)
    state = model.state_dict()
    regime = regime or cfg.model.finetune
    if regime == "svf":
        backbone = {k: v for k, v in state.items() if k.startswith("backbone.") and k.endswith(".S")}
    elif regime == "full":
        backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    else:
        backbone = {}
    return {"format": FORMAT, "config": cfg.to_dict(), "finetune": regime,
            "head": {k: v.detach().cpu().clone() for k, v in state.items() if not k.startswith(("backbone.", "base."))},
            "backbone": {k: v.detach().cpu().clone() for k, v in backbone.items()},
            "backbone_fingerprint": model.backbone_fingerprint, **(extra or {})}


def save(state: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def _load(path: str | Path, fmt: str, what: str, stage: str) -> dict:
    """torch.load a file of ours, with errors that name the file and the stage that makes it."""
    path = require(path, what, stage)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} {path} is corrupt or not a PyTorch file ({type(e).__name__}: {e}); "
                         f"re-run the {stage} stage") from e
    if not isinstance(state, dict) or state.get("format") != fmt:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not an svf-fss {what} (format {found!r}, expected {fmt!r})")
    return state


def read(path: str | Path) -> dict:
    return _load(path, FORMAT, "adapter", "train")


def base_path(adapter_path: str | Path) -> Path:
    """models/fold<i>/base/base.pt beside models/fold<i>/<k>shot/adapter.pt."""
    return Path(adapter_path).parent.parent / "base" / "base.pt"


def load_model(path: str | Path, cfg=None, base: str | Path | None = None):
    """(model in eval mode, config) rebuilt from base weights + adapter; the model keeps its SVF form.
    BAM's base learner comes from ``base`` (default: the fold's, beside the adapter's folder)."""
    state = read(path)
    cfg = cfg or config_from_dict(state["config"])
    learner = read_base(base or base_path(path), cfg) if cfg.model.head == "bam" else None
    model, _ = build_model(cfg, finetune=state["finetune"], base=learner, shots=state.get("shots", 1))
    if model.backbone_fingerprint != state["backbone_fingerprint"]:
        what = "base learner" if learner else f"base backbone weights than model.pretrained={cfg.model.pretrained!r} gives now"
        raise ValueError(f"adapter {path} was trained on another {what} (sha256 {state['backbone_fingerprint'][:12]} "
                         f"vs {model.backbone_fingerprint[:12]})")
    missing, unexpected = model.load_state_dict({**state["head"], **state["backbone"]}, strict=False)
    head_missing = [k for k in missing if not k.startswith(("backbone.", "base."))]
    if head_missing or unexpected:
        raise ValueError(f"adapter {path} does not fit the model: missing {head_missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), cfg


def size_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for part in ("head", "backbone") for v in state[part].values())


MERGED_FORMAT = "svf-fss-merged/1"


def merged_state(model, cfg, parity: dict | None = None) -> dict:
    """A dense model (no SVFConv2d left) as a plain state_dict plus its config, its shot count (BAM's kshot_rw
    and the baseline's summed shots depend on it) and, for BAM, the base classifier's class count."""
    from .svf import SVFConv2d
    if any(isinstance(m, SVFConv2d) for m in model.modules()):
        raise ValueError("merged_state needs a merged model; call merge_svf first")
    shape = {"shots": getattr(model, "shots", 1), **({"base_classes": model.base.classes} if hasattr(model, "base") else {})}
    return {"format": MERGED_FORMAT, "config": cfg.to_dict(), "state_dict": {k: v.detach().cpu() for k, v in
                                                                            model.state_dict().items()},
            "parity": parity or {}, **shape}


def load_merged(path: str | Path):
    """(dense model in eval mode, config) from merged.pt: standard torchvision/PyTorch modules only."""
    state = _load(path, MERGED_FORMAT, "merged model", "merge")
    cfg = config_from_dict(state["config"])
    base = {"classes": state["base_classes"]} if cfg.model.head == "bam" else None
    model, _ = build_model(cfg, finetune="frozen", pretrained="none", base=base, shots=state.get("shots", 1))
    model.load_state_dict(state["state_dict"], strict=True)
    return model.eval(), cfg


# ------------------------------------------------------------------ BAM's base learner
BASE_KEYS = ("backbone", "dilation", "output_stride")


def base_state(model, cfg, fold: int, base_classes: list[int], extra: dict | None = None) -> dict:
    """The trained base learner (PSPNet) of ``fold``, with what it must match to be reused."""
    from .models import state_fingerprint
    model = getattr(model, "module", model)
    return {"format": BASE_FORMAT, "config": cfg.to_dict(), "fold": fold, "benchmark": cfg.data.benchmark,
            "base_classes": list(base_classes), "classes": len(base_classes) + 1,
            **{k: getattr(cfg.model, k) for k in BASE_KEYS},
            "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "fingerprint": state_fingerprint(model), **(extra or {})}


def read_base(path: str | Path, cfg, fold: int | None = None) -> dict:
    """Load a base learner checkpoint and refuse one that does not fit ``cfg`` (and ``fold``): another
    fold, benchmark, class count or backbone is named, with what was expected."""
    from .data.benchmarks import fold_classes
    state = _load(path, BASE_FORMAT, "base learner", "base" if fold is None else f"base@{fold}")
    fold = state["fold"] if fold is None else fold
    expect = {"fold": fold, "benchmark": cfg.data.benchmark, **{k: getattr(cfg.model, k) for k in BASE_KEYS},
              "classes": len(fold_classes(cfg, fold)[1]) + 1}
    wrong = [f"{k} {state.get(k)!r} (expected {v!r})" for k, v in expect.items() if state.get(k) != v]
    if wrong:
        raise ValueError(f"base learner {path} does not fit this model: {', '.join(wrong)}; re-run the base stage "
                         f"(`dvc repro base@{fold}`)")
    return state
