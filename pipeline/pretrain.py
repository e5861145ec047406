"""Offline backbone pretraining: the synthetic benchmark's stand-in for ImageNet weights.

The backbone (layer0..layer4, output stride 8) with a 1x1 head on layer4 learns, per pixel,
class-agnostic targets of a separately generated image set: objectness, the object's colour (hue
bin) and its texture kind. No image or label of the benchmark is used, so the novel classes stay
unseen, as the few-shot protocol requires. BatchNorm trains here (as in ImageNet pretraining) and
is frozen afterwards. The result is a checkpoint in the architecture's own layout.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .data.episodes import normalize
from .data.synthetic import HUE_BINS, TEXTURES, generate_pretrain_image
from .models.backbone import Backbone, to_checkpoint_state

log = logging.getLogger(__name__)


def pretrain(arch: str, out_path: str | Path, iterations: int = 300, batch: int = 16, size: int = 96, seed: int = 0,
             lr: float = 2e-3, images: int = 2000) -> dict:
    torch.manual_seed(seed)
    bb = Backbone(arch, output_stride=8)
    c4 = bb.channels[2]
    head = nn.Conv2d(c4 + bb.channels[0], 1 + HUE_BINS + len(TEXTURES), 1)
    params = list(bb.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    nn.Module.train(bb, True)          # BatchNorm statistics are learnt here, unlike in fine-tuning
    cache: dict[int, tuple] = {}

    def sample(i):
        if i not in cache:
            img, tgt = generate_pretrain_image(i, size, seed)
            x = normalize(torch.from_numpy(np.array(img)).permute(2, 0, 1))
            cache[i] = (x, torch.from_numpy(tgt).long())
        return cache[i]

    rng = np.random.default_rng(seed)
    losses = []
    bar = tqdm(range(iterations), desc=f"pretrain {arch}", unit="it", mininterval=1.0)
    for it in bar:
        idx = rng.integers(0, images, batch)
        xs, ts = zip(*(sample(int(i)) for i in idx))
        x, t = torch.stack(xs), torch.stack(ts)
        if rng.random() < 0.5:
            x, t = x.flip(-1), t.flip(-1)
        f2 = bb.layer2(bb.layer1(bb.layer0(x)))
        f4 = bb.layer4(bb.layer3(f2))
        logits = F.interpolate(head(torch.cat([f4, F.interpolate(f2, size=f4.shape[-2:], mode="bilinear",
                                                                 align_corners=False)], 1)),
                               size=x.shape[-2:], mode="bilinear", align_corners=False)
        lo = F.cross_entropy(torch.stack([-logits[:, 0], logits[:, 0]], 1), t[:, 0])
        lh = F.cross_entropy(logits[:, 1:1 + HUE_BINS], t[:, 1], ignore_index=255)
        lt = F.cross_entropy(logits[:, 1 + HUE_BINS:], t[:, 2], ignore_index=255)
        loss = lo + lh + lt
        for g in opt.param_groups:
            g["lr"] = lr * (1 - it / iterations) ** 0.9
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if it % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save({k: v.detach().cpu().clone() for k, v in to_checkpoint_state(bb).items()}, tmp)
    os.replace(tmp, out_path)
    return {"arch": arch, "iterations": iterations, "batch": batch, "size": size, "seed": seed,
            "final_loss": float(np.mean(losses[-20:])), "file": str(out_path)}
