"""The training loop both learners share: SGD groups with their LR schedule, seeded batches, exact
resume, validation with the best state kept and early stopping, curves, NaN guard, DDP.

``fit`` knows nothing of heads or data: the caller gives it a step (batch -> loss and its parts), a
validation (iteration -> score, a row for the curves, the state worth keeping), and a config
section with the loop's fields (``train`` for the few-shot meta learner, ``base`` for BAM's base
learner: iterations/epochs, batch_size, schedule, poly_power, patience, checkpoint_every,
log_every, seed, workers).
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import adapter as adapter_io
from .config import diff_configs
from .data.episodes import PREFETCH, Epochs, check_shared_memory, steps_per_epoch

log = logging.getLogger(__name__)
# keys that may change between an interrupted run and its resume without changing the result
RESUME_FREE = {"train.checkpoint_every", "train.log_every", "train.workers",
               "base.checkpoint_every", "base.log_every", "base.workers"}


class NaNLossError(RuntimeError):
    pass


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available; use 'auto' or 'cpu'")
    return torch.device(name if name != "cuda" else f"cuda:{local_rank}")


def describe_device(device: torch.device) -> str:
    """What runs the work, for logs and MLflow: a silent CPU fallback must not pass for a slow GPU."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{device} ({p.name}, {p.total_memory / 2**30:.0f} GiB)"
    return f"cpu ({torch.get_num_threads()} threads)"


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
    if rank == 0:
        log.info("device: %s%s", describe_device(device), f", {world} processes (the global batch is split between "
                 f"them)" if world > 1 else "")
    return rank, world, device


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def optimizer(groups: list[tuple[list, float]], lc) -> torch.optim.Optimizer:
    """``lc.optimizer`` over (parameters, base LR) groups, empty groups dropped: SGD with ``lc.momentum``
    (the papers' recipe) or AdamW (the synthetic default: in 300 iterations PFENet reached 58 mIoU with
    it, 33 and 42 with SGD at 0.025 and 0.1); weight decay ``lc.weight_decay`` either way."""
    groups = [{"params": ps, "base_lr": lr} for ps, lr in groups if ps]
    if lc.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["base_lr"], weight_decay=lc.weight_decay)
    return torch.optim.SGD(groups, lr=groups[0]["base_lr"], momentum=lc.momentum, weight_decay=lc.weight_decay)


def lr_factor(schedule: str, it: int, total: int, power: float) -> float:
    """The LR multiplier at iteration ``it`` (0-based) of ``total``."""
    if schedule == "constant":
        return 1.0
    return (1 - it / total) ** power


def wrap_distributed(model, sync_bn: bool, world: int, device):
    """DDP (with SyncBN if asked) around ``model`` when several processes train, else ``model``."""
    if world == 1:
        return model
    net = model
    if sync_bn:
        if device.type != "cuda":
            raise ValueError("sync_bn needs CUDA devices (SyncBatchNorm has no CPU implementation)")
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


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

    def record(self, it: int, score: float, row: dict, keep: Callable[[], dict]) -> None:
        """One validation: its curve row; the best score's state (``keep()``), or one more stale round."""
        self.history["val"].append({"iteration": it, **row})
        if score > self.best:
            self.best, self.best_iteration, self.stale = score, it, 0
            self.best_state = keep()
        else:
            self.stale += 1


def save_checkpoint(path: Path, state: State, model, opt, scaler, cfg, device) -> None:
    adapter_io.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                     "rng_cpu": torch.get_rng_state(),
                     "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                     "state": state.to_dict(), "config": cfg.to_dict()}, path)


def resume(path: Path, state: State, model, opt, scaler, cfg, device, sections) -> bool:
    """Restore an interrupted run from ``path``; False when there is none. Refuses a checkpoint whose
    config differs in ``sections`` (sections or dotted key prefixes)."""
    if not path.exists():
        return False
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if "state" not in ck:
        raise ValueError(f"checkpoint {path} was written by an older version of the training loop; delete it to "
                         "start over")
    differ = [k for k in diff_configs(ck["config"], cfg.to_dict(), sections) if k not in RESUME_FREE]
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


@dataclass
class Run:
    """One training run: where it is, what it trains, and where its records go."""
    cfg: object                       # the whole Config (saved in checkpoints)
    lc: object                        # the loop's config section (cfg.train or cfg.base)
    sections: tuple                   # config keys a resume must find unchanged
    model: torch.nn.Module
    net: torch.nn.Module              # the model, or DDP around it
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dataset: object                   # indexable by (epoch, index)
    device: torch.device
    rank: int
    world: int
    ckpt_file: Path
    plots_dir: Path
    desc: str
    log_metrics: Callable | None = None
    section: str = "train"            # the params.yaml section of ``lc``, for messages
    seen: int = 0                     # samples this process trained on (all ranks)

    @property
    def batch(self) -> int:
        """This process's share of the global batch (``batch_size`` is global: the same recipe on 1 or N GPUs)."""
        if self.lc.batch_size % self.world:
            raise ValueError(f"{self.section}.batch_size {self.lc.batch_size} (the global batch) is not divisible by "
                             f"the {self.world} processes; make it a multiple of {self.world}")
        return self.lc.batch_size // self.world


def update(run: Run, loss: torch.Tensor) -> None:
    """Backward and SGD step through the scaler; a non-finite loss skips the update (``fit`` then stops)."""
    if torch.isfinite(loss):
        run.opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.opt)
        run.scaler.update()


def steps_and_total(run: Run, n: int) -> tuple[int, int, int]:
    """(steps per epoch, total iterations, validation interval) for ``n`` samples an epoch."""
    lc = run.lc
    steps = steps_per_epoch(n, run.batch, run.world)
    return steps, (lc.epochs * steps if lc.epochs else lc.iterations), (steps if lc.epochs else lc.val_every)


def fit(run: Run, step: Callable, validate: Callable, steps: int, total: int, val_every: int) -> State:
    """Train ``run.model`` for ``total`` iterations (resuming from ``run.ckpt_file`` when it exists).

    ``step(batch) -> (loss, {part: value}, batch size)`` does forward, backward and optimizer step;
    ``validate(iteration) -> (score, curve row, keep)`` scores the model, ``keep()`` giving the state
    to save if the score is the best so far. Rank 0 alone validates, checkpoints and writes.
    """
    lc, main = run.lc, run.rank == 0
    state = State()
    if resume(run.ckpt_file, state, run.model, run.opt, run.scaler, run.cfg, run.device, run.sections):
        if main:
            log.info("%s: resuming from %s at iteration %d", run.desc, run.ckpt_file, state.iteration)
    else:
        torch.manual_seed(lc.seed + run.rank)
    last_good = state.iteration if run.ckpt_file.exists() else None
    loader_gen = torch.Generator().manual_seed(lc.seed)

    def batches(from_it):
        # one loader for the whole run, its workers started once (not at every epoch)
        epoch, b = divmod(from_it, steps)
        sampler = Epochs(len(run.dataset), run.batch, run.world, run.rank, lc.seed, epoch, b)
        if lc.workers:
            check_shared_memory(run.dataset, run.batch, lc.workers, PREFETCH, run.section)
        yield from DataLoader(run.dataset, batch_sampler=sampler, num_workers=lc.workers, generator=loader_gen,
                              pin_memory=run.device.type == "cuda",
                              **({"prefetch_factor": PREFETCH} if lc.workers else {}))

    run.net.train()
    it_data = batches(state.iteration)
    bar = tqdm(range(state.iteration, total), desc=run.desc, unit="it", disable=not main,
               initial=state.iteration, total=total, mininterval=1.0)
    for it in bar:
        factor = lr_factor(lc.schedule, it, total, lc.poly_power)
        for g in run.opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        loss, parts, n = step(next(it_data))
        if not torch.isfinite(loss):
            where = (f"; the last good checkpoint {run.ckpt_file} (iteration {last_good}) is kept"
                     if last_good is not None else "; no checkpoint had been written yet")
            raise NaNLossError(f"loss became {loss.item()} at iteration {it} ({run.desc}){where}. "
                               f"Lower {run.section}.lr or disable {run.section}.amp")
        state.iteration = it + 1
        run.seen += n * run.world
        if main and ((it + 1) % lc.log_every == 0 or it == 0):
            row = {"iteration": it + 1, "loss": round(loss.item(), 5),
                   **{k: round(float(v.detach()), 5) for k, v in parts.items()}, "lr": run.opt.param_groups[0]["lr"]}
            if len(run.opt.param_groups) > 1:
                row["lr_backbone"] = run.opt.param_groups[1]["lr"]
            state.history["train"].append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
            write_csv(run.plots_dir / "train.csv", state.history["train"])
            if run.log_metrics:
                run.log_metrics({k: v for k, v in row.items() if k != "iteration"}, it + 1)
        last = it + 1 == total
        if (it + 1) % val_every == 0 or last:
            if main:
                score, vrow, keep = validate(it + 1)
                state.record(it + 1, score, vrow, keep)
                log.info("%s, iteration %d: validation %.2f (best %.2f at %d)", run.desc, it + 1, score, state.best,
                         state.best_iteration)
                write_csv(run.plots_dir / "val.csv", state.history["val"])
                if run.log_metrics:
                    run.log_metrics(vrow, it + 1)
                run.net.train()
            if run.world > 1:
                flag = torch.tensor([state.stale], device=run.device)
                dist.broadcast(flag, 0)
                state.stale = int(flag.item())
            if lc.patience and state.stale >= lc.patience and not last:
                state.stopped_early = True
                if main:
                    log.info("no better validation in %d rounds: stopping at iteration %d (best %.2f at %d)",
                             state.stale, it + 1, state.best, state.best_iteration)
                break
        if main and ((it + 1) % lc.checkpoint_every == 0 and not last):
            save_checkpoint(run.ckpt_file, state, run.model, run.opt, run.scaler, run.cfg, run.device)
            last_good = it + 1
    bar.close()
    return state


def finish(run: Run) -> None:
    """After a finished run: drop the checkpoint (the next run starts fresh), leave the process group."""
    if run.rank == 0 and run.ckpt_file.exists():
        run.ckpt_file.unlink()
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()
