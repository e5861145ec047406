"""Episodic base-class training: single process, or several under torchrun (DDP).

SGD with momentum (the papers) or AdamW (the synthetic default), weight decay on every trained
parameter, S included, and a learning rate that
is ``poly`` (PFENet/BAM: (1 - it/total)^0.9 per iteration) or ``constant`` (the SVF authors' runs:
their train_pfenet.py creates a fresh CosineAnnealingLR at every iteration, line 284, and steps it
once, so the LR never leaves its base value), ``train.lr`` on the head and ``lr *
backbone_lr_scale`` on the backbone (the authors' LR/10; PFENet's hidden x10 is written out in the
presets instead). Length in iterations or epochs; validation on the novel classes every
``val_every`` iterations or after every epoch, the best state kept, optional early stop after
``patience`` validations without improvement. AMP on CUDA; checkpoints every N iterations with
exact resume (data order, augmentation and dropout RNG, best state and patience all restored).
Rank 0 alone validates, checkpoints and writes. The loop itself is pipeline/loop.py, shared with
BAM's base learner (pipeline/train_base.py); this file is what is particular to episodes.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from . import adapter as adapter_io
from .data.benchmarks import fold_classes, prepared_dir, require, split_dir
from .data.episodes import EpisodeDataset, to_model
from .evaluate import evaluate
from .figures import curves_figure
from .loop import (NaNLossError, Run, describe_device, finish, fit, init_distributed, lr_factor, optimizer, pick_device,
                   steps_and_total, update, wrap_distributed)
from .models import build_model, head_loss, train_inputs

log = logging.getLogger(__name__)
__all__ = ["NaNLossError", "checkpoint_path", "lr_factor", "make_optimizer", "pick_device", "train"]
# a resume must find these unchanged (``base`` too: BAM's meta stage starts from the base learner)
SECTIONS = ("data", "split", "model", "base", "train")


def checkpoint_path(cfg, fold: int, shots: int) -> Path:
    """Where the resumable checkpoint lives: outside DVC's outputs, so `dvc repro` does not delete it."""
    return Path("checkpoints") / cfg.data.benchmark / f"fold{fold}" / f"{shots}shot" / "checkpoint.pt"


def param_checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))


def make_optimizer(model, tc) -> torch.optim.Optimizer:
    """``tc.optimizer`` over the head (``lr``) and the trainable backbone parameters (``lr * backbone_lr_scale``)."""
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    body = [p for p in model.backbone.parameters() if p.requires_grad]
    return optimizer([(head, tc.lr), (body, tc.lr * tc.backbone_lr_scale)], tc)


def datasets(cfg, fold: int, shots: int):
    """(training episodes, validation episodes) of ``fold`` with ``shots`` supports each; BAM's
    training episodes carry the query's base-class label too."""
    tc = cfg.train
    prepared, splits = prepared_dir(cfg.data.root, cfg.data.benchmark), split_dir(cfg.data.root, cfg.data.benchmark, fold)
    for f in (splits / "train.jsonl", splits / "val.jsonl"):
        require(f, "split file", "split")
    base = fold_classes(cfg, fold)[1] if cfg.model.head == "bam" else None
    train_ds = EpisodeDataset(prepared, splits / "train.jsonl", shots, "train", tc.crop_size, tc.seed,
                              scale=tc.scale, rotate=tc.rotate, sampling=tc.sampling, base_classes=base,
                              hue_jitter=tc.hue_jitter)
    val_ds = EpisodeDataset(prepared, splits / "val.jsonl", shots, "test", cfg.eval.test_size, seed=tc.seed,
                            episodes=tc.val_episodes, protocol=cfg.eval.protocol)
    return train_ds, val_ds


def episode_step(run: Run, amp: bool, aux_weight: float):
    """forward + head loss + backward + optimizer step on one batch of episodes (a non-finite loss skips the update)."""
    def step(batch):
        batch = to_model(batch, run.device)
        with torch.autocast(device_type=run.device.type, dtype=torch.float16, enabled=amp):
            out = run.net(batch["query"], batch["support"], batch["support_mask"], **train_inputs(run.model, batch))
            loss, parts = head_loss(run.model, out, batch, aux_weight)
        update(run, loss)
        return loss, parts, batch["query"].shape[0]
    return step


def episode_validation(model, val_ds, device, cfg, shots: int):
    """Score the novel classes; the state kept for the best score is the adapter."""
    def validate(it):
        acc, _ = evaluate(model, val_ds, device, desc=f"val @{it}", progress=False, workers=cfg.train.workers)
        miou, fbiou = 100 * acc.miou(), 100 * acc.fbiou()
        keep = lambda: adapter_io.adapter_state(model, cfg, {"iteration": it, "val_miou": miou, "shots": shots})  # noqa: E731
        return miou, {"val_miou": round(miou, 3), "val_fbiou": round(fbiou, 3)}, keep
    return validate


def write_results(model, cfg, state, counts: dict, shots: int, out_dir: Path) -> dict:
    """Save the best adapter (or the last, without validation) and describe it."""
    best = state.best_state or adapter_io.adapter_state(model, cfg, {"iteration": state.iteration, "shots": shots})
    path = adapter_io.save(best, out_dir / "adapter.pt")
    dense = counts["total"] + counts["head"] + counts.get("base", 0) * (cfg.model.finetune != "frozen")
    out = {"best_val_miou": round(state.best, 3), "best_iteration": state.best_iteration, "adapter": str(path),
           "adapter_bytes": adapter_io.size_bytes(best), "adapter_file_bytes": path.stat().st_size,
           "trainable_backbone_params": counts["trainable"], "head_params": counts["head"],
           "full_model_param_bytes": int(4 * dense)}   # float32 dense parameters of the deployed model
    if "base" in counts:
        out["base_learner_params"] = counts["base"]
    return out


def train(cfg, fold: int, shots: int, out_dir: str | Path, plots_dir: str | Path, log_metrics=None,
          base_file: str | Path | None = None, checkpoint: str | Path | None = None) -> dict:
    """Train the ``shots``-shot model of one fold; write ``out_dir/adapter.pt`` and the curves in
    ``plots_dir``. BAM reads its base learner from ``base_file``; the resumable checkpoint goes to
    ``checkpoint`` (default: checkpoints/<benchmark>/fold<i>/<k>shot/checkpoint.pt). Returns a summary."""
    t0, tc = time.time(), cfg.train
    rank, world, device = init_distributed(tc.device)
    out_dir, plots_dir = Path(out_dir), Path(plots_dir)
    train_ds, val_ds = datasets(cfg, fold, shots)
    base = None
    if cfg.model.head == "bam":
        base = adapter_io.read_base(base_file or Path(out_dir).parent / "base" / "base.pt", cfg, fold)
    model, counts = build_model(cfg, base=base, shots=shots)
    model.to(device)
    opt = make_optimizer(model, tc)
    amp = tc.amp and device.type == "cuda"
    run = Run(cfg, tc, SECTIONS, model, wrap_distributed(model, tc.sync_bn, world, device), opt,
              torch.amp.GradScaler("cuda", enabled=amp), train_ds, device, rank, world,
              Path(checkpoint or checkpoint_path(cfg, fold, shots)), plots_dir, f"train fold{fold} {shots}-shot", log_metrics)
    steps, total, val_every = steps_and_total(run, len(train_ds))
    if rank == 0:
        log.info("fold %d, %d-shot: %s head, %s backbone, regime %s: %s trainable backbone parameters of %s, "
                 "head %s; %d iterations (%d per epoch of %d %s episodes)", fold, shots, cfg.model.head,
                 cfg.model.backbone, cfg.model.finetune, f"{counts['trainable']:,}", f"{counts['total']:,}",
                 f"{counts['head']:,}", total, steps, len(train_ds), tc.sampling)
    state = fit(run, episode_step(run, amp, tc.aux_weight), episode_validation(model, val_ds, device, cfg, shots),
                steps, total, val_every)
    summary = {"fold": fold, "shots": shots, "iterations": state.iteration, "planned_iterations": total,
               "stopped_early": state.stopped_early, "world_size": world, "device": str(device),
               "device_name": describe_device(device),
               "seconds": round(time.time() - t0, 1), "param_checksum": param_checksum(model),
               "episodes_per_second": round(run.seen / max(time.time() - t0, 1e-9), 2)}
    log.info("rank %d finished: parameter checksum %.6f", rank, summary["param_checksum"])
    if rank == 0:
        summary.update(write_results(model, cfg, state, counts, shots, out_dir))
        curves_figure(state.history["train"], state.history["val"], plots_dir / "curves.png",
                      f"fold {fold}, {shots}-shot: {cfg.model.head}, {cfg.model.finetune} regime, {tc.schedule} LR")
    finish(run)
    return summary
