"""Figures a person looks at: episodes with their predictions, IoU per class, training curves, the
regime ablation.

Colours are chosen not to collide with the objects' own: the prediction is a translucent cyan fill,
the truth and the support masks a white outline.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> Path:
    """Lay out, write (creating the folder) and close ``fig``."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path


FILL_RGB, FILL_ALPHA = (0, 255, 255), 0.45        # translucent cyan: a colour no synthetic object has


def overlay(image: np.ndarray, mask: np.ndarray, color=FILL_RGB) -> np.ndarray:
    """The image (uint8 HxWx3) with the mask (HxW, 1 object) filled translucent (cyan unless ``color``) and
    outlined solid, at the image's resolution; numpy only, for the service and the command line."""
    m = mask == 1
    out = image.astype(np.float32)
    out[m] = (1 - FILL_ALPHA) * out[m] + FILL_ALPHA * np.array(color, np.float32)
    p = np.pad(m, 1, mode="edge")
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    out[m & ~inner] = color
    return out.round().astype(np.uint8)


def episodes_figure(episodes: list[dict], path, class_names: list[str] | None = None, title: str = "") -> Path:
    """One row per episode: the query, the query with the prediction (translucent cyan) and the truth
    (white outline), and the supports with their masks outlined in white."""
    plt = _plt()
    import torch.nn.functional as F     # here: the report stage draws its figure without torch

    from .data.episodes import MEAN, STD

    def show(t):
        img = (t.permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)).clip(0, 1)
        return img

    k = max(ep["support"].shape[0] for ep in episodes)
    cols = 2 + k
    fill = np.array([*(c / 255 for c in FILL_RGB), FILL_ALPHA])

    def overlay(ax, img, mask=None, outline=None):
        ax.imshow(img)
        if mask is not None:
            rgba = np.zeros((*mask.shape, 4))
            rgba[mask == 1] = fill
            ax.imshow(rgba)
        if outline is not None and (outline == 1).any():
            ax.contour(outline == 1, levels=[0.5], colors="white", linewidths=1.5)

    fig, axes = plt.subplots(len(episodes), cols, figsize=(2.4 * cols, 2.5 * len(episodes)), squeeze=False)
    for r, ep in enumerate(episodes):
        h, w = ep["valid"].tolist()
        q = show(ep["query"])[:h, :w]
        pred = F.interpolate(ep["pred"][None, None].float(), size=(h, w), mode="nearest")[0, 0].numpy()
        gt = F.interpolate(ep["label"][None, None].float(), size=(h, w), mode="nearest")[0, 0].numpy()
        name = class_names[ep["class"] - 1] if class_names else str(ep["class"])
        overlay(axes[r, 0], q)
        axes[r, 0].set_title(f"query ({name})", fontsize=8)
        overlay(axes[r, 1], q, pred, gt)
        inter = ((pred == 1) & (gt == 1)).sum()
        union = (((pred == 1) | (gt == 1)) & (gt != 255)).sum()
        axes[r, 1].set_title(f"prediction (cyan), truth (white)\nIoU {100 * inter / max(union, 1):.0f}%", fontsize=8)
        for j in range(k):
            ax = axes[r, 2 + j]
            if j < ep["support"].shape[0]:
                overlay(ax, show(ep["support"][j]), outline=ep["support_mask"][j].numpy())
                ax.set_title(f"support {j + 1} (mask: white)", fontsize=8)
        for ax in axes[r]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def per_class_figure(report: dict, path, title: str = "") -> Path:
    """Bar chart of the IoU of every novel class, one bar per shot count, the range over seeds as
    error bars. ``report`` is the evaluate stage's report (per-class IoU keyed by class name)."""
    plt = _plt()
    shots = [k for k, v in report.items() if "shot" in k and isinstance(v, dict)]
    names = list(report[shots[0]]["per_class_iou"]) if shots else []
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * max(len(names), 1), 3.4))
    width = 0.8 / max(len(shots), 1)
    for j, k in enumerate(shots):
        s = report[k]
        means = [s["per_class_iou"].get(n, 0.0) for n in names]
        seeds = [s.get("per_class_iou_per_seed", {}).get(n, [m]) for n, m in zip(names, means)]
        lo = [m - min(v) for m, v in zip(means, seeds)]
        hi = [max(v) - m for m, v in zip(means, seeds)]
        xs = [i + (j - (len(shots) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, means, width, yerr=[lo, hi], capsize=2, label=f"{k} (mIoU {s['miou']:.1f})")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("IoU %")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def curves_figure(train_rows: list[dict], val_rows: list[dict], path, title: str = "",
                  val_title: str = "validation on novel classes (%)") -> Path:
    """Training curves: the total loss and its parts; learning rate; validation mIoU and FB-IoU."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    it = [r["iteration"] for r in train_rows]
    parts = [k for k in (train_rows[0] if train_rows else {}) if k.endswith("loss") and k != "loss"]
    for key, style in zip(["loss"] + parts, ["-", "--", ":", "-."]):
        if train_rows and key in train_rows[0]:
            axes[0].plot(it, [r[key] for r in train_rows], style, label=key.replace("_", " "))
    axes[0].set_title("loss", fontsize=9)
    axes[0].legend(fontsize=7)
    lr_keys = [k for k in (train_rows[0] if train_rows else {}) if k.startswith("lr")]
    for key in lr_keys:
        axes[1].plot(it, [r[key] for r in train_rows], label=key)
    axes[1].set_title("learning rate", fontsize=9)
    if lr_keys:
        axes[1].legend(fontsize=7)
    vit = [r["iteration"] for r in val_rows]
    for key in ("val_miou", "val_fbiou"):
        if val_rows and key in val_rows[0]:
            axes[2].plot(vit, [r[key] for r in val_rows], "o-", label=key.replace("val_", "val ").replace("iou", "IoU"))
    axes[2].set_title(val_title, fontsize=9)
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("iteration", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def ablation_figure(result: dict, path) -> Path:
    """Left: mIoU per regime and shot count, the bar the mean, dots every (training seed, evaluation
    seed) pair, error bars the standard deviation over training seeds when there are several (over
    evaluation seeds otherwise). Right: the paired differences with 95% intervals."""
    plt = _plt()
    regimes = list(result["regimes"])
    keys = sorted({k for r in result["regimes"].values() for k, v in r.items() if isinstance(v, dict)})
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.2, 1]})
    width = 0.8 / max(len(keys), 1)
    lo = min((p for r in result["regimes"].values() for k in keys if r.get(k)
              for seeds in r[k]["per_eval_seed"] for p in seeds), default=0.0)
    ax_floor = max(0.0, lo - 10)
    for j, k in enumerate(keys):
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(regimes))]
        stats = [result["regimes"][r].get(k) for r in regimes]
        means = [s["miou"] if s else 0.0 for s in stats]
        errs = [(s["std_train_seeds"] if s["std_train_seeds"] is not None else s["std_eval_seeds"]) if s else 0.0
                for s in stats]
        bars = ax.bar(xs, means, width, yerr=errs, capsize=3, label=k, alpha=0.8)
        for x, s in zip(xs, stats):
            pts = [p for seeds in (s or {}).get("per_eval_seed", []) for p in seeds]
            ax.plot([x] * len(pts), pts, "k.", ms=4)
        for bar, m in zip(bars, means):
            ax.annotate(f"{m:.1f}", (bar.get_x() + bar.get_width() / 2, ax_floor), xytext=(0, 4),
                        textcoords="offset points", ha="center", fontsize=7)
    ax.set_xticks(range(len(regimes)), regimes)
    ax.set_ylim(ax_floor, 100)
    ax.set_ylabel("mIoU % (novel classes)")
    trained = f"{len(result['train_seeds'])} training seeds, " if len(result["train_seeds"]) > 1 else ""
    ax.set_title(f"fold {result['fold']}: mIoU per regime ({trained}{len(result['eval_seeds'])} evaluation seeds x "
                 f"{result['episodes_per_seed']} episodes)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    rows = [(f"{pair}, {k}", d) for k, ds in result["differences"].items() for pair, d in ds.items()]
    for i, (label, d) in enumerate(rows):
        lo_, hi_ = d["ci95"]
        dx.errorbar([d["mean"]], [i], xerr=[[d["mean"] - lo_], [hi_ - d["mean"]]], fmt="o", capsize=4,
                    color="tab:green" if lo_ > 0 else "tab:red" if hi_ < 0 else "tab:gray")
        dx.annotate(f"{d['mean']:+.2f} [{lo_:+.2f}, {hi_:+.2f}]", (d["mean"], i), textcoords="offset points",
                    xytext=(0, 7), ha="center", fontsize=7)
    dx.axvline(0, color="k", lw=0.8)
    ends = [0.0] + [v for _, d in rows for v in d["ci95"]]
    pad = 0.45 * (max(ends) - min(ends) or 1.0)      # room for the labels beside the outermost intervals
    dx.set_xlim(min(ends) - pad, max(ends) + pad)
    dx.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    dx.set_ylim(len(rows) - 0.3, -0.7)
    dx.set_xlabel("mIoU difference (points, same episodes)")
    dx.set_title("paired differences, 95% bootstrap intervals", fontsize=9)
    dx.grid(axis="x", alpha=0.3)
    return _save(fig, path)
