"""BAM's base learner: PSPNet trained on the fold's base classes, before the meta stage.

BAM's train_base.py recipe, as parameters (``base`` in params.yaml): every training image with its
base classes renumbered 1..N and every other class 0; BatchNorm in train mode (SyncBN under
torchrun); SGD momentum 0.9, weight decay 1e-4, poly 0.9 per iteration; the backbone at ``lr *
backbone_lr_scale``, PPM + classifier at ``lr``; its own crop, scale range and length. Validation:
mean IoU over the base classes (background excluded) on the validation images, their labels
resized with the image, as BAM's base validation scores them; the best state is kept. Resume after
an interruption is exact, as for the meta stage (the loop is pipeline/loop.py).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import adapter as adapter_io
from .data.benchmarks import fold_classes, prepared_dir
from .data.episodes import IGNORE, to_model
from .data.semantic import SemanticDataset
from .figures import curves_figure
from .loop import Run, describe_device, finish, fit, init_distributed, optimizer, steps_and_total, update, wrap_distributed
from .models import base_learner

log = logging.getLogger(__name__)
# a resume (and the reuse of base.pt) depends on these only: not on the few-shot head or its training
SECTIONS = ("data", "split", "base", "model.backbone", "model.pretrained", "model.output_stride", "model.dilation",
            "model.init_seed")


def checkpoint_path(cfg, fold: int) -> Path:
    return Path("checkpoints") / cfg.data.benchmark / f"fold{fold}" / "base" / "checkpoint.pt"


def base_datasets(cfg, fold: int, classes: list[int]):
    """(training, validation) images of the fold: every prepared image of each list (BAM's base learner
    sees the whole train list; its novel classes are background)."""
    bc = cfg.base
    prepared = prepared_dir(cfg.data.root, cfg.data.benchmark)
    ids = {s: (prepared / f"{s}.txt").read_text().split() for s in ("train", "val")}
    val_ids = ids["val"][:bc.val_images] if bc.val_images else ids["val"]
    return (SemanticDataset(prepared, ids["train"], classes, "train", bc.crop_size, bc.seed, bc.scale, bc.rotate),
            SemanticDataset(prepared, val_ids, classes, "test", bc.crop_size, bc.seed))   # BAM: val_size = train_h


@torch.no_grad()
def base_miou(model, ds, device, batch: int = 4, workers: int = 0) -> tuple[float, list[float]]:
    """(mIoU over the base classes, per-class IoU), intersections and unions summed over the images; the
    images prepared by ``workers`` loader processes, scored on the model's device."""
    model.eval()
    inter = torch.zeros(ds.classes, dtype=torch.float64, device=device)
    union = torch.zeros(ds.classes, dtype=torch.float64, device=device)
    for b in DataLoader(ds, batch_size=batch, num_workers=workers):
        pred = model(b["image"].to(device)).argmax(1)
        y = b["label"].to(device)
        ok = y != IGNORE
        p, t = pred[ok], y[ok]
        inter += torch.bincount(t[p == t], minlength=ds.classes).double()
        union += (torch.bincount(p, minlength=ds.classes) + torch.bincount(t, minlength=ds.classes)).double()
    inter, union = inter.cpu(), union.cpu()
    union -= inter
    ious = (inter / union.clamp_min(1)).tolist()[1:]
    seen = [iou for iou, u in zip(ious, union.tolist()[1:]) if u > 0]
    return (100 * sum(seen) / len(seen) if seen else 0.0), [round(100 * i, 3) for i in ious]


def train_base(cfg, fold: int, out_dir: str | Path, plots_dir: str | Path, log_metrics=None) -> dict:
    """Train the fold's base learner; write ``out_dir/base.pt`` and its curves in ``plots_dir``."""
    t0, bc = time.time(), cfg.base
    rank, world, device = init_distributed(cfg.train.device)
    out_dir, plots_dir = Path(out_dir), Path(plots_dir)
    classes = fold_classes(cfg, fold)[1]
    train_ds, val_ds = base_datasets(cfg, fold, classes)
    model = base_learner(cfg.model, len(classes) + 1, pretrained=cfg.model.pretrained, root=cfg.data.root).to(device)
    heads = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    opt = optimizer([(heads, bc.lr), (list(model.backbone.parameters()), bc.lr * bc.backbone_lr_scale)], bc)
    amp = bc.amp and device.type == "cuda"
    run = Run(cfg, bc, SECTIONS, model, wrap_distributed(model, bc.sync_bn, world, device), opt,
              torch.amp.GradScaler("cuda", enabled=amp), train_ds, device, rank, world, checkpoint_path(cfg, fold),
              plots_dir, f"base learner fold{fold}", log_metrics, section="base")
    steps, total, val_every = steps_and_total(run, len(train_ds))
    if rank == 0:
        log.info("fold %d base learner: PSPNet on %s, %d classes (background + %d base), %s parameters; %d iterations "
                 "(%d per epoch of %d images)", fold, cfg.model.backbone, len(classes) + 1, len(classes),
                 f"{sum(p.numel() for p in model.parameters()):,}", total, steps, len(train_ds))

    def step(batch):
        batch = to_model(batch, device)
        x, y = batch["image"], batch["label"]
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            loss = F.cross_entropy(run.net(x).float(), y, ignore_index=IGNORE)
        update(run, loss)
        return loss, {}, x.shape[0]

    def validate(it):
        miou, per_class = base_miou(model, val_ds, device, workers=cfg.base.workers)
        keep = lambda: adapter_io.base_state(model, cfg, fold, classes, {"iteration": it, "val_miou": miou,  # noqa: E731
                                                                        "class_iou": per_class})
        return miou, {"val_miou": round(miou, 3)}, keep

    state = fit(run, step, validate, steps, total, val_every)
    summary = {"fold": fold, "iterations": state.iteration, "planned_iterations": total,
               "stopped_early": state.stopped_early, "device": str(device), "world_size": world,
               "device_name": describe_device(device),
               "seconds": round(time.time() - t0, 1), "images_per_second": round(run.seen / max(time.time() - t0, 1e-9), 2)}
    if rank == 0:
        best = state.best_state or adapter_io.base_state(model, cfg, fold, classes, {"iteration": state.iteration})
        adapter_io.save(best, out_dir / "base.pt")
        summary.update({"base_miou": round(state.best, 3), "best_iteration": state.best_iteration,
                        "class_iou": dict(zip(map(str, classes), best.get("class_iou", []))),
                        "params": sum(p.numel() for p in model.parameters()), "classes": len(classes) + 1})
        curves_figure(state.history["train"], state.history["val"], plots_dir / "curves.png",
                      f"fold {fold}: base learner (PSPNet, {cfg.model.backbone}), BN in train mode",
                      val_title="validation on base classes (%)")
    finish(run)
    return summary


__all__ = ["base_miou", "checkpoint_path", "train_base"]
