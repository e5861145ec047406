"""Episodic evaluation, exactly as the protocol scores it.

Logits of the padded test image are cropped to the valid (resized) region, upsampled bilinearly to
the ORIGINAL label size and scored there; label 255 is ignored. Per novel class, foreground
intersection and union are summed over all its episodes (IoU_c = sum I / sum U); mIoU is the mean
over the fold's novel classes. FB-IoU pools background and foreground IoU the same way and averages.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data.episodes import IGNORE



@dataclass
class IoUAccumulator:
    classes: list[int]
    inter: dict = field(default_factory=dict)
    union: dict = field(default_factory=dict)
    fb_inter: list = field(default_factory=lambda: [0, 0])
    fb_union: list = field(default_factory=lambda: [0, 0])
    episodes: int = 0

    def add(self, pred: torch.Tensor, label: torch.Tensor, cls: int) -> None:
        """pred, label: [H, W] with pred in {0, 1}, label in {0, 1, 255}."""
        valid = label != IGNORE
        p, t = pred[valid].bool(), label[valid].bool()
        for k, (pk, tk) in enumerate(((~p, ~t), (p, t))):
            self.fb_inter[k] += int((pk & tk).sum())
            self.fb_union[k] += int((pk | tk).sum())
        self.inter[cls] = self.inter.get(cls, 0) + int((p & t).sum())
        self.union[cls] = self.union.get(cls, 0) + int((p | t).sum())
        self.episodes += 1

    def class_iou(self) -> dict[int, float]:
        return {c: self.inter[c] / self.union[c] for c in self.classes if self.union.get(c, 0) > 0}

    def miou(self) -> float:
        """Mean over the fold's classes that occurred in at least one episode."""
        ious = self.class_iou()
        return float(np.mean(list(ious.values()))) if ious else float("nan")

    def fbiou(self) -> float:
        return float(np.mean([i / u if u else 0.0 for i, u in zip(self.fb_inter, self.fb_union)]))


def predict_original(logits: torch.Tensor, valid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """logits [2, S, S] of the padded test image -> prediction [H, W] at the original resolution."""
    h, w = int(valid[0]), int(valid[1])
    crop = logits[:, :h, :w].unsqueeze(0).float()
    up = F.interpolate(crop, size=tuple(int(s) for s in size), mode="bilinear", align_corners=True)
    return up[0].argmax(0)


@torch.no_grad()
def evaluate(model, dataset, device, desc: str = "eval", progress: bool = True, keep: int = 0):
    """Run every episode of ``dataset`` (mode 'test') through ``model``; returns (IoUAccumulator, kept).

    ``kept`` holds the first ``keep`` episodes with their predictions, for figures.
    """
    model.eval()
    acc = IoUAccumulator(sorted(dataset.classes))
    kept = []
    for i in tqdm(range(len(dataset)), desc=desc, unit="ep", disable=not progress, mininterval=2.0):
        ep = dataset[i]
        logits = model(ep["query"][None].to(device), ep["support"][None].to(device),
                       ep["support_mask"][None].to(device))[0]
        pred = predict_original(logits, ep["valid"].tolist(), ep["label"].shape).cpu()
        acc.add(pred, ep["label"], ep["class"])
        if len(kept) < keep:
            kept.append({**ep, "pred": pred})
    return acc, kept


def summarise(per_seed: list[IoUAccumulator]) -> dict:
    """Mean and spread over seeds of mIoU and FB-IoU, and the mean per-class IoU (in %)."""
    mious = [100 * a.miou() for a in per_seed]
    fbious = [100 * a.fbiou() for a in per_seed]
    classes = sorted({c for a in per_seed for c in a.class_iou()})
    per_class = {str(c): 100 * float(np.mean([a.class_iou()[c] for a in per_seed if c in a.class_iou()]))
                 for c in classes}
    return {"miou": float(np.mean(mious)), "miou_std": float(np.std(mious)),
            "miou_min": float(np.min(mious)), "miou_max": float(np.max(mious)),
            "fbiou": float(np.mean(fbious)), "fbiou_std": float(np.std(fbious)),
            "per_seed_miou": mious, "per_class_iou": per_class,
            "episodes": int(sum(a.episodes for a in per_seed))}


def figure(episodes: list[dict], path, class_names: list[str] | None = None, title: str = "") -> None:
    """Query with ground truth and prediction, and the supports with their masks, one row per episode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data.episodes import MEAN, STD

    def show(t):
        img = (t.permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)).clip(0, 1)
        return img

    k = max(ep["support"].shape[0] for ep in episodes)
    cols = 2 + k
    fig, axes = plt.subplots(len(episodes), cols, figsize=(2.4 * cols, 2.4 * len(episodes)), squeeze=False)
    for r, ep in enumerate(episodes):
        h, w = ep["valid"].tolist()
        q = show(ep["query"])[:h, :w]
        pred = F.interpolate(ep["pred"][None, None].float(), size=(h, w), mode="nearest")[0, 0].numpy()
        gt = F.interpolate(ep["label"][None, None].float(), size=(h, w), mode="nearest")[0, 0].numpy()
        name = class_names[ep["class"] - 1] if class_names else str(ep["class"])
        axes[r, 0].imshow(q)
        axes[r, 0].contour(gt == 1, levels=[0.5], colors="lime", linewidths=1)
        axes[r, 0].set_title(f"query, truth ({name})", fontsize=8)
        axes[r, 1].imshow(q)
        axes[r, 1].imshow(np.ma.masked_where(pred != 1, pred), cmap="autumn", alpha=0.55)
        inter = ((pred == 1) & (gt == 1)).sum()
        union = (((pred == 1) | (gt == 1)) & (gt != 255)).sum()
        axes[r, 1].set_title(f"prediction, IoU {100 * inter / max(union, 1):.0f}%", fontsize=8)
        for j in range(k):
            ax = axes[r, 2 + j]
            if j < ep["support"].shape[0]:
                ax.imshow(show(ep["support"][j]))
                ax.contour(ep["support_mask"][j].numpy() == 1, levels=[0.5], colors="lime", linewidths=1)
                ax.set_title(f"support {j + 1} (mask outlined)", fontsize=8)
        for ax in axes[r]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def spread_text(summary: dict) -> str:
    return (f"mIoU {summary['miou']:.2f} +- {summary['miou_std']:.2f} (min {summary['miou_min']:.2f}, "
            f"max {summary['miou_max']:.2f}), FB-IoU {summary['fbiou']:.2f}")

