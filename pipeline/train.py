"""Episodic base-class training: single process, or several under torchrun (DDP).

SGD with momentum and weight decay (on every trained parameter, S included), a learning rate that
is ``poly`` (PFENet/BAM: (1 - it/total)^0.9 per iteration) or ``constant`` (the SVF authors' runs:
their train_pfenet.py creates a fresh CosineAnnealingLR at every iteration, line 284, and steps it
once, so the LR never leaves its base value), ``train.lr`` on the head and ``lr *
backbone_lr_scale`` on the backbone (the authors' LR/10; PFENet's hidden x10 is written out in the
presets instead). Length in iterations or epochs; validation on the novel classes every
``val_every`` iterations or after every epoch, the best state kept, optional early stop after
``patience`` validations without improvement. AMP on CUDA; checkpoints every N iterations with
exact resume (data order, augmentation and dropout RNG, best state and patience all restored).
Rank 0 alone validates, checkpoints and writes.
"""
from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import adapter as adapter_io
from .config import diff_configs
from .data.benchmarks import prepared_dir, split_dir
from .data.episodes import EpisodeDataset, EpochBatches, steps_per_epoch
from .evaluate import evaluate
from .figures import curves_figure
from .models import build_model, pfenet_loss

log = logging.getLogger(__name__)
# keys that may change between an interrupted run and its resume without changing the result
RESUME_FREE = {"train.checkpoint_every", "train.log_every", "train.workers"}


class NaNLossError(RuntimeError):
    pass


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(name if name != "cuda" else f"cuda:{local_rank}")


def init_distributed(device_name: str):
    """(rank, world size, device); initialises the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def checkpoint_path(cfg, fold: int, shots: int) -> Path:
    """Where the resumable checkpoint lives: outside DVC's outputs, so `dvc repro` does not delete it."""
    return Path("checkpoints") / cfg.data.benchmark / f"fold{fold}" / f"{shots}shot" / "checkpoint.pt"


def param_checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))


def make_optimizer(model, tc) -> torch.optim.SGD:
    """SGD over the head (``lr``) and the trainable backbone parameters (``lr * backbone_lr_scale``)."""
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    body = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": head, "base_lr": tc.lr}]
    if body:
        groups.append({"params": body, "base_lr": tc.lr * tc.backbone_lr_scale})
    return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)


def lr_factor(schedule: str, it: int, total: int, power: float) -> float:
    """The LR multiplier at iteration ``it`` (0-based) of ``total``."""
    if schedule == "constant":
        return 1.0
    return (1 - it / total) ** power


def wrap_distributed(model, tc, world: int, device):
    """DDP (with SyncBN if asked) around ``model`` when several processes train, else ``model``."""
    if world == 1:
        return model
    net = model
    if tc.sync_bn:
        if device.type != "cuda":
            raise ValueError("train.sync_bn needs CUDA devices (SyncBatchNorm has no CPU implementation)")
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def datasets(cfg, fold: int, shots: int):
    """(training episodes, validation episodes) of ``fold`` with ``shots`` supports each."""
    tc = cfg.train
    prepared, splits = prepared_dir(cfg.data.root, cfg.data.benchmark), split_dir(cfg.data.root, cfg.data.benchmark, fold)
    for f in (splits / "train.jsonl", splits / "val.jsonl"):
        if not f.exists():
            raise FileNotFoundError(f"split file {f} is missing; run the split stage (`dvc repro split`) first")
    train_ds = EpisodeDataset(prepared, splits / "train.jsonl", shots, "train", tc.crop_size, tc.seed,
                              scale=tc.scale, rotate=tc.rotate, sampling=tc.sampling)
    val_ds = EpisodeDataset(prepared, splits / "val.jsonl", shots, "test", cfg.eval.test_size, seed=tc.seed,
                            episodes=tc.val_episodes, protocol=cfg.eval.protocol)
    return train_ds, val_ds


class State:
    """Everything a resume needs besides model, optimizer and scaler: position, best, patience, curves."""

    def __init__(self):
        self.iteration, self.best, self.best_iteration, self.best_state = 0, -1.0, -1, None
        self.stale, self.stopped_early = 0, False
        self.history = {"train": [], "val": []}

    def to_dict(self) -> dict:
        return dict(vars(self))

    def load(self, d: dict) -> None:
        for k in vars(self):
            if k in d:
                setattr(self, k, d[k])


def save_checkpoint(path: Path, state: State, model, opt, scaler, cfg, device) -> None:
    adapter_io.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                     "rng_cpu": torch.get_rng_state(),
                     "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                     "state": state.to_dict(), "config": cfg.to_dict()}, path)


def resume(path: Path, state: State, model, opt, scaler, cfg, device) -> bool:
    """Restore an interrupted run from ``path``; False when there is none. Refuses another config."""
    if not path.exists():
        return False
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if "state" not in ck:
        raise ValueError(f"checkpoint {path} was written by an older version of the training loop; delete it to "
                         "start over")
    differ = [k for k in diff_configs(ck["config"], cfg.to_dict()) if k not in RESUME_FREE]
    if differ:
        raise ValueError(f"checkpoint {path} was written with a different config ({', '.join(differ)} "
                         f"differ); delete it to start over, or restore those parameters to resume")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    scaler.load_state_dict(ck["scaler"])
    torch.set_rng_state(ck["rng_cpu"])
    if device.type == "cuda" and ck.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(ck["rng_cuda"], device)
    state.load(ck["state"])
    return True


def validate(model, val_ds, device, state: State, cfg, it: int, shots: int) -> float:
    """Score the novel classes, keep the best adapter state, count validations without improvement."""
    acc, _ = evaluate(model, val_ds, device, desc=f"val @{it}", progress=False)
    miou, fbiou = 100 * acc.miou(), 100 * acc.fbiou()
    state.history["val"].append({"iteration": it, "val_miou": round(miou, 3), "val_fbiou": round(fbiou, 3)})
    if miou > state.best:
        state.best, state.best_iteration, state.stale = miou, it, 0
        state.best_state = adapter_io.adapter_state(model, cfg, {"iteration": it, "val_miou": miou, "shots": shots})
    else:
        state.stale += 1
    log.info("iteration %d: val mIoU %.2f (best %.2f at %d)", it, miou, state.best, state.best_iteration)
    return miou


def train_step(net, opt, scaler, batch, device, amp: bool, aux_weight: float):
    q, s, sm, y = (batch[k].to(device, non_blocking=True) for k in ("query", "support", "support_mask", "query_mask"))
    with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
        out = net(q, s, sm)
        loss, main_loss, aux_loss = pfenet_loss(out, y, aux_weight)
    if torch.isfinite(loss):
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return loss, main_loss, aux_loss, q.shape[0]


def train_row(iteration: int, loss, main_loss, aux_loss, opt) -> dict:
    """One row of the training curve: the losses and the learning rate of each group."""
    row = {"iteration": iteration, "loss": round(loss.item(), 5), "main_loss": round(main_loss.item(), 5),
           "aux_loss": round(aux_loss.item(), 5), "lr": opt.param_groups[0]["lr"]}
    if len(opt.param_groups) > 1:
        row["lr_backbone"] = opt.param_groups[1]["lr"]
    return row


def write_results(model, cfg, state: State, counts: dict, shots: int, out_dir: Path) -> dict:
    """Save the best adapter (or the last, without validation) and describe it."""
    best = state.best_state or adapter_io.adapter_state(model, cfg, {"iteration": state.iteration, "shots": shots})
    path = adapter_io.save(best, out_dir / "adapter.pt")
    return {"best_val_miou": round(state.best, 3), "best_iteration": state.best_iteration, "adapter": str(path),
            "adapter_bytes": adapter_io.size_bytes(best), "adapter_file_bytes": path.stat().st_size,
            "trainable_backbone_params": counts["trainable"], "head_params": counts["head"],
            "full_model_param_bytes": int(4 * (counts["total"] + counts["head"]))}   # float32 dense parameters


def train(cfg, fold: int, shots: int, out_dir: str | Path, plots_dir: str | Path, log_metrics=None) -> dict:
    """Train the ``shots``-shot model of one fold; write ``out_dir/adapter.pt`` and the curves in
    ``plots_dir``. Returns a summary."""
    t0, tc = time.time(), cfg.train
    rank, world, device = init_distributed(tc.device)
    main = rank == 0
    out_dir, plots_dir = Path(out_dir), Path(plots_dir)
    train_ds, val_ds = datasets(cfg, fold, shots)
    steps = steps_per_epoch(len(train_ds), tc.batch_size, world)
    total = tc.epochs * steps if tc.epochs else tc.iterations
    val_every = steps if tc.epochs else tc.val_every

    model, counts = build_model(cfg)
    model.to(device)
    if main:
        log.info("fold %d, %d-shot: %s head, %s backbone, regime %s: %s trainable backbone parameters of %s, "
                 "head %s; %d iterations (%d per epoch of %d %s episodes)", fold, shots, cfg.model.head,
                 cfg.model.backbone, cfg.model.finetune, f"{counts['trainable']:,}", f"{counts['total']:,}", f"{counts['head']:,}",
                 total, steps, len(train_ds), tc.sampling)
    opt = make_optimizer(model, tc)
    amp = tc.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    net = wrap_distributed(model, tc, world, device)

    ckpt_file, state = checkpoint_path(cfg, fold, shots), State()
    if resume(ckpt_file, state, model, opt, scaler, cfg, device):
        if main:
            log.info("resuming fold %d from %s at iteration %d", fold, ckpt_file, state.iteration)
    else:
        torch.manual_seed(tc.seed + rank)
    last_good = state.iteration if ckpt_file.exists() else None

    loader_gen = torch.Generator().manual_seed(tc.seed)

    def batches(from_it):
        epoch, b = divmod(from_it, steps)
        while True:
            sampler = EpochBatches(len(train_ds), tc.batch_size, world, rank, tc.seed, epoch, b)
            yield from DataLoader(train_ds, batch_sampler=sampler, num_workers=tc.workers, generator=loader_gen,
                                  persistent_workers=False, pin_memory=device.type == "cuda")
            epoch, b = epoch + 1, 0

    net.train()
    it_data, seen = batches(state.iteration), 0
    bar = tqdm(range(state.iteration, total), desc=f"train fold{fold}", unit="it", disable=not main,
               initial=state.iteration, total=total, mininterval=1.0)
    for it in bar:
        factor = lr_factor(tc.schedule, it, total, tc.poly_power)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        loss, main_loss, aux_loss, n = train_step(net, opt, scaler, next(it_data), device, amp, tc.aux_weight)
        if not torch.isfinite(loss):
            where = f"; the last good checkpoint {ckpt_file} (iteration {last_good}) is kept" if last_good is not None \
                else "; no checkpoint had been written yet"
            raise NaNLossError(f"loss became {loss.item()} at iteration {it} (fold {fold}, {shots}-shot){where}. "
                               "Lower train.lr or disable train.amp")
        seen += n * world
        state.iteration = it + 1
        if main and ((it + 1) % tc.log_every == 0 or it == 0):
            row = train_row(it + 1, loss, main_loss, aux_loss, opt)
            state.history["train"].append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
            _write_csv(plots_dir / "train.csv", state.history["train"])
            if log_metrics:
                log_metrics({k: v for k, v in row.items() if k != "iteration"}, it + 1)
        last = it + 1 == total
        if (it + 1) % val_every == 0 or last:
            if main:
                validate(model, val_ds, device, state, cfg, it + 1, shots)
                _write_csv(plots_dir / "val.csv", state.history["val"])
                if log_metrics:
                    log_metrics({k: v for k, v in state.history["val"][-1].items() if k != "iteration"}, it + 1)
                net.train()
            if world > 1:
                flag = torch.tensor([state.stale], device=device)
                dist.broadcast(flag, 0)
                state.stale = int(flag.item())
            if tc.patience and state.stale >= tc.patience and not last:
                state.stopped_early = True
                if main:
                    log.info("no better val mIoU in %d validations: stopping at iteration %d (best %.2f at %d)",
                             state.stale, it + 1, state.best, state.best_iteration)
                break
        if main and ((it + 1) % tc.checkpoint_every == 0 and not last):
            save_checkpoint(ckpt_file, state, model, opt, scaler, cfg, device)
            last_good = it + 1
    bar.close()

    summary = {"fold": fold, "shots": shots, "iterations": state.iteration, "planned_iterations": total,
               "stopped_early": state.stopped_early, "world_size": world, "device": str(device),
               "seconds": round(time.time() - t0, 1), "param_checksum": param_checksum(model),
               "episodes_per_second": round(seen / max(time.time() - t0, 1e-9), 2)}
    log.info("rank %d finished: parameter checksum %.6f", rank, summary["param_checksum"])
    if main:
        summary.update(write_results(model, cfg, state, counts, shots, out_dir))
        curves_figure(state.history["train"], state.history["val"], plots_dir / "curves.png",
                      f"fold {fold}, {shots}-shot: {cfg.model.head}, {cfg.model.finetune} regime, {tc.schedule} LR")
        if ckpt_file.exists():
            ckpt_file.unlink()   # finished: the next run of this stage starts fresh
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary
