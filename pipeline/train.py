"""Episodic base-class training: single process, or several under torchrun (DDP).

SGD with momentum and weight decay, poly learning rate per iteration, a separate LR scale for
backbone parameters (the authors' LR/10), AMP on CUDA, checkpoints every N iterations with exact
resume (data order, augmentation and dropout RNG all restored), validation on the novel classes
with the best state kept. Rank 0 alone validates, checkpoints and writes.
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


def checkpoint_path(cfg, fold: int) -> Path:
    """Where the resumable checkpoint lives: outside DVC's outputs, so `dvc repro` does not delete it."""
    return Path("checkpoints") / cfg.data.benchmark / f"fold{fold}" / "checkpoint.pt"


def param_checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))


def train(cfg, fold: int, out_dir: str | Path, plots_dir: str | Path, log_metrics=None) -> dict:
    """Train one fold; write ``out_dir/adapter.pt`` and the curves in ``plots_dir``. Returns a summary."""
    t0 = time.time()
    tc = cfg.train
    rank, world, device = init_distributed(tc.device)
    main = rank == 0
    out_dir, plots_dir = Path(out_dir), Path(plots_dir)
    prepared, splits = prepared_dir(cfg.data.root, cfg.data.benchmark), split_dir(cfg.data.root, cfg.data.benchmark, fold)
    for f in (splits / "train.jsonl", splits / "val.jsonl"):
        if not f.exists():
            raise FileNotFoundError(f"split file {f} is missing; run the split stage (`dvc repro split`) first")
    train_ds = EpisodeDataset(prepared, splits / "train.jsonl", tc.shots, "train", tc.crop_size, tc.seed,
                              scale=tc.scale, rotate=tc.rotate)
    val_ds = EpisodeDataset(prepared, splits / "val.jsonl", 1, "test", cfg.eval.test_size, seed=tc.seed,
                            episodes=tc.val_episodes)

    model, counts = build_model(cfg)
    model.to(device)
    if main:
        log.info("fold %d: %s head, %s backbone, regime %s: %s trainable backbone parameters of %s, head %s",
                 fold, cfg.model.head, cfg.model.backbone, cfg.model.finetune, f"{counts['trainable']:,}",
                 f"{counts['total']:,}", f"{counts['head']:,}")
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    body = [p for p in model.backbone.parameters() if p.requires_grad]
    groups = [{"params": head, "base_lr": tc.lr}]
    if body:
        groups.append({"params": body, "base_lr": tc.lr * tc.backbone_lr_scale})
    opt = torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
    amp = tc.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    net = model
    if world > 1:
        if tc.sync_bn:
            if device.type != "cuda":
                raise ValueError("train.sync_bn needs CUDA devices (SyncBatchNorm has no CPU implementation)")
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)

    ckpt_file = checkpoint_path(cfg, fold)
    start, best, best_it, best_state = 0, -1.0, -1, None
    history = {"train": [], "val": []}
    if ckpt_file.exists():
        ck = torch.load(ckpt_file, map_location="cpu", weights_only=True)
        differ = [k for k in diff_configs(ck["config"], cfg.to_dict()) if k not in RESUME_FREE]
        if differ:
            raise ValueError(f"checkpoint {ckpt_file} was written with a different config ({', '.join(differ)} "
                             f"differ); delete it to start over, or restore those parameters to resume")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng_cpu"])
        if device.type == "cuda" and ck.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ck["rng_cuda"], device)
        start, best, best_it, best_state, history = (ck["iteration"], ck["best"], ck["best_iteration"],
                                                     ck["best_state"], ck["history"])
        if main:
            log.info("resuming fold %d from %s at iteration %d", fold, ckpt_file, start)
    else:
        torch.manual_seed(tc.seed + rank)

    steps = steps_per_epoch(len(train_ds), tc.batch_size, world)
    loader_gen = torch.Generator().manual_seed(tc.seed)

    def batches(from_it):
        epoch, b = divmod(from_it, steps)
        while True:
            sampler = EpochBatches(len(train_ds), tc.batch_size, world, rank, tc.seed, epoch, b)
            yield from DataLoader(train_ds, batch_sampler=sampler, num_workers=tc.workers, generator=loader_gen,
                                  persistent_workers=False, pin_memory=device.type == "cuda")
            epoch, b = epoch + 1, 0

    last_good = start if ckpt_file.exists() else None

    def save_checkpoint(iteration):
        nonlocal last_good
        ck = {"iteration": iteration, "model": model.state_dict(), "optimizer": opt.state_dict(),
              "scaler": scaler.state_dict(), "rng_cpu": torch.get_rng_state(),
              "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
              "best": best, "best_iteration": best_it, "best_state": best_state, "history": history,
              "config": cfg.to_dict()}
        adapter_io.save(ck, ckpt_file)
        last_good = iteration

    net.train()
    it_data = batches(start)
    bar = tqdm(range(start, tc.iterations), desc=f"train fold{fold}", unit="it", disable=not main,
               initial=start, total=tc.iterations, mininterval=1.0)
    seen = 0
    for it in bar:
        batch = next(it_data)
        factor = (1 - it / tc.iterations) ** tc.poly_power
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        q = batch["query"].to(device, non_blocking=True)
        s = batch["support"].to(device, non_blocking=True)
        sm = batch["support_mask"].to(device, non_blocking=True)
        y = batch["query_mask"].to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            out = net(q, s, sm)
            loss, main_loss, aux_loss = pfenet_loss(out, y, tc.aux_weight)
        if not torch.isfinite(loss):
            where = f"; the last good checkpoint {ckpt_file} (iteration {last_good}) is kept" if last_good is not None \
                else "; no checkpoint had been written yet"
            raise NaNLossError(f"loss became {loss.item()} at iteration {it} (fold {fold}){where}. Lower train.lr "
                               "or disable train.amp")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        seen += q.shape[0] * world
        if main and ((it + 1) % tc.log_every == 0 or it == 0):
            row = {"iteration": it + 1, "loss": round(loss.item(), 5), "main_loss": round(main_loss.item(), 5),
                   "aux_loss": round(aux_loss.item(), 5), "lr": opt.param_groups[0]["lr"]}
            history["train"].append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
            _write_csv(plots_dir / "train.csv", history["train"])
            if log_metrics:
                log_metrics({k: v for k, v in row.items() if k != "iteration"}, it + 1)
        last = it + 1 == tc.iterations
        if (it + 1) % tc.val_every == 0 or last:
            if main:
                acc, _ = evaluate(model, val_ds, device, desc=f"val @{it + 1}", progress=False)
                miou = 100 * acc.miou()
                history["val"].append({"iteration": it + 1, "val_miou": round(miou, 3), "val_fbiou": round(100 * acc.fbiou(), 3)})
                _write_csv(plots_dir / "val.csv", history["val"])
                if log_metrics:
                    log_metrics({"val_miou": miou, "val_fbiou": 100 * acc.fbiou()}, it + 1)
                if miou > best:
                    best, best_it = miou, it + 1
                    best_state = adapter_io.adapter_state(model, cfg, {"iteration": it + 1, "val_miou": miou})
                log.info("iteration %d: val mIoU %.2f (best %.2f at %d)", it + 1, miou, best, best_it)
                net.train()
            if world > 1:
                dist.barrier()
        if main and ((it + 1) % tc.checkpoint_every == 0 and not last):
            save_checkpoint(it + 1)
    bar.close()

    summary = {"fold": fold, "iterations": tc.iterations, "world_size": world, "device": str(device),
               "seconds": round(time.time() - t0, 1), "param_checksum": param_checksum(model)}
    log.info("rank %d finished: parameter checksum %.6f", rank, summary["param_checksum"])
    if main:
        state = best_state or adapter_io.adapter_state(model, cfg, {"iteration": tc.iterations})
        path = adapter_io.save(state, out_dir / "adapter.pt")
        full = 4 * (counts["total"] + counts["head"])   # float32 parameters of the dense model
        summary.update(best_val_miou=round(best, 3), best_iteration=best_it, adapter=str(path),
                       adapter_bytes=adapter_io.size_bytes(state), adapter_file_bytes=path.stat().st_size,
                       trainable_backbone_params=counts["trainable"], head_params=counts["head"],
                       full_model_param_bytes=int(full), episodes_per_second=round(seen / max(time.time() - t0, 1e-9), 2))
        if ckpt_file.exists():
            ckpt_file.unlink()   # finished: the next run of this stage starts fresh
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary

