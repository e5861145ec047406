"""Semantic segmentation over a fold's base classes: the data of BAM's base learner.

Labels as BAM's base annotation makes them: base classes renumbered 1..N (in the fold's order),
every other class 0, 255 kept. Training images are augmented with the protocol's transform (scale,
rotation, blur, flip) and cropped at random; validation images are resized and padded like test
episodes and scored against the resized label. Every random choice is seeded by (seed, epoch, index).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .episodes import TrainTransform, base_lut, eval_transform, load_pair


class SemanticDataset(Dataset):
    def __init__(self, prepared: str | Path, image_ids: list[str], base_classes: list[int], mode: str = "train",
                 size: int = 417, seed: int = 0, scale=(0.5, 2.0), rotate: float = 10.0):
        if mode not in ("train", "test"):
            raise ValueError(f"unknown mode {mode!r}; choose 'train' or 'test'")
        if not image_ids:
            raise ValueError(f"no {mode} images for the base learner under {prepared}")
        self.root, self.ids, self.mode, self.size, self.seed = Path(prepared), list(image_ids), mode, size, seed
        self.lut = base_lut(base_classes)
        self.classes = len(base_classes) + 1
        self.tf = TrainTransform(size, scale, rotate) if mode == "train" else None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index) -> dict:
        epoch, index = index if isinstance(index, tuple) else (0, index)
        img, label = load_pair(self.root, self.ids[index])
        label = self.lut[label.long()].to(torch.uint8)
        if self.mode == "train":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(np.random.default_rng([self.seed, epoch, index]).integers(2 ** 31)))
                x, y = self.tf(img, label, keep_class=None)
            return {"image": x, "label": y, "index": index}          # uint8 both: episodes.to_model converts
        x, y, valid = eval_transform(img, label, self.size)
        return {"image": x, "label": y.long(), "index": index, "valid": torch.tensor(valid)}
