"""The adapter: what training produces and what SVF makes small.

It holds the head's weights, the backbone's singular values (``svf``; the whole backbone for
``full``, nothing for ``frozen``), the config, and the sha256 of the base backbone weights it was
trained from. Base weights + adapter rebuild the trained model exactly.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import config_from_dict
from .models import build_model

FORMAT = "svf-fss-adapter/1"


def adapter_state(model, cfg, extra: dict | None = None) -> dict:
    model = getattr(model, "module", model)
    state = model.state_dict()
    regime = cfg.model.finetune
    if regime == "svf":
        backbone = {k: v for k, v in state.items() if k.startswith("backbone.") and k.endswith(".S")}
    elif regime == "full":
        backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    else:
        backbone = {}
    return {"format": FORMAT, "config": cfg.to_dict(), "finetune": regime,
            "head": {k: v.detach().cpu().clone() for k, v in state.items() if not k.startswith("backbone.")},
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
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} is missing; run the {stage} stage (`dvc repro {stage}`) first")
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


def load_model(path: str | Path, cfg=None):
    """(model in eval mode, config) rebuilt from base weights + adapter; the model keeps its SVF form."""
    state = read(path)
    cfg = cfg or config_from_dict(state["config"])
    model, _ = build_model(cfg, finetune=state["finetune"])
    if model.backbone_fingerprint != state["backbone_fingerprint"]:
        raise ValueError(f"adapter {path} was trained on other base backbone weights than model.pretrained="
                         f"{cfg.model.pretrained!r} gives now (sha256 {state['backbone_fingerprint'][:12]} vs "
                         f"{model.backbone_fingerprint[:12]})")
    missing, unexpected = model.load_state_dict({**state["head"], **state["backbone"]}, strict=False)
    head_missing = [k for k in missing if not k.startswith("backbone.")]
    if head_missing or unexpected:
        raise ValueError(f"adapter {path} does not fit the model: missing {head_missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), cfg


def size_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for part in ("head", "backbone") for v in state[part].values())


MERGED_FORMAT = "svf-fss-merged/1"


def merged_state(model, cfg, parity: dict | None = None) -> dict:
    """A dense model (no SVFConv2d left) as a plain state_dict plus its config."""
    from .svf import SVFConv2d
    if any(isinstance(m, SVFConv2d) for m in model.modules()):
        raise ValueError("merged_state needs a merged model; call merge_svf first")
    return {"format": MERGED_FORMAT, "config": cfg.to_dict(), "state_dict": {k: v.detach().cpu() for k, v in
                                                                            model.state_dict().items()},
            "parity": parity or {}}


def load_merged(path: str | Path):
    """(dense model in eval mode, config) from merged.pt: standard torchvision/PyTorch modules only."""
    state = _load(path, MERGED_FORMAT, "merged model", "merge")
    cfg = config_from_dict(state["config"])
    model, _ = build_model(cfg, finetune="frozen", pretrained="none")
    model.load_state_dict(state["state_dict"], strict=True)
    return model.eval(), cfg
