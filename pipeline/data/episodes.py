"""Episodes (query + k supports) and the joint image/mask transforms of the protocol.

Every random choice of an episode (which pair, which supports, every augmentation) is drawn from
generators seeded by (seed, epoch, index), so an episode is the same in any worker, any process
and after a resume.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .split import images_per_class, read_pairs

log = logging.getLogger(__name__)
cv2.setNumThreads(0)      # one thread per loader process: the workers are the parallelism

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MEAN_255 = [round(m * 255) for m in MEAN]
IGNORE = 255


def binarize(label: torch.Tensor, cls: int) -> torch.Tensor:
    """Episode label: the episode's class -> 1, 255 stays 255, every other class -> 0."""
    out = torch.zeros_like(label)
    out[label == cls] = 1
    out[label == IGNORE] = IGNORE
    return out


_MEAN_T, _STD_T = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)


def normalize(img: torch.Tensor) -> torch.Tensor:
    """(img / 255 - MEAN) / STD as a new float tensor, computed in place on one copy."""
    return _normalize_(img.to(torch.float32, copy=True))


def _normalize_(x: torch.Tensor) -> torch.Tensor:
    return x.div_(255.0).sub_(_MEAN_T).div_(_STD_T)


class TrainTransform:
    """PFENet/BAM training augmentation, image and mask moved together, on uint8 with OpenCV as their
    util/transform.py does it.

    Random scale (bilinear; nearest for the mask), rotation about the centre (p 0.5; the mean colour and
    the ignore label fill the corners), Gaussian blur (p 0.5, 5x5, sigma in [0.1, 2]), horizontal flip,
    then a crop of ``crop`` x ``crop`` (padding with the mean colour and the ignore label) that keeps most
    of the foreground. Takes and returns uint8 tensors (image [3, H, W], mask [H, W]): the workers ship a
    quarter of float32's bytes and the model's device normalises (``to_model``). 3.0 ms an image at
    640x480 -> 473 on one core, against 24 ms with torchvision's kernels (which warp in float).
    Draws from torch's global generator: seed it (EpisodeDataset does) for determinism.
    """

    def __init__(self, crop: int, scale=(0.9, 1.1), rotate: float = 10.0, tries: int = 10, keep: float = 0.85):
        self.crop, self.scale, self.rotate, self.tries, self.keep = crop, tuple(scale), rotate, tries, keep

    @staticmethod
    def _u(lo, hi):
        return lo + (hi - lo) * float(torch.rand(()))

    def __call__(self, img: torch.Tensor, mask: torch.Tensor, keep_class: int | None = 1):
        """``mask`` may be a class-index label: the crop keeps most of ``keep_class``'s pixels (None: any crop)."""
        im = np.ascontiguousarray(img.permute(1, 2, 0).numpy())
        m = np.ascontiguousarray(mask.numpy())
        h, w = m.shape
        s = self._u(*self.scale)
        size = (max(1, round(w * s)), max(1, round(h * s)))         # OpenCV's (width, height)
        im = cv2.resize(im, size, interpolation=cv2.INTER_LINEAR)
        m = cv2.resize(m, size, interpolation=cv2.INTER_NEAREST)
        if torch.rand(()) < 0.5:
            rot = cv2.getRotationMatrix2D((size[0] / 2, size[1] / 2), self._u(-self.rotate, self.rotate), 1.0)
            im = cv2.warpAffine(im, rot, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                borderValue=tuple(MEAN_255))
            m = cv2.warpAffine(m, rot, size, flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=IGNORE)
        if torch.rand(()) < 0.5:
            im = cv2.GaussianBlur(im, (5, 5), self._u(0.1, 2.0))
        if torch.rand(()) < 0.5:
            im, m = im[:, ::-1], m[:, ::-1]
        im, m = self._crop(im, m, keep_class)
        return (torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))),
                torch.from_numpy(np.ascontiguousarray(m)))

    def _crop(self, img: np.ndarray, mask: np.ndarray, keep_class: int | None = 1):
        c = self.crop
        h, w = mask.shape
        ph, pw = max(c - h, 0), max(c - w, 0)
        if ph or pw:
            pad = (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)
            img = cv2.copyMakeBorder(np.ascontiguousarray(img), *pad, cv2.BORDER_CONSTANT, value=tuple(MEAN_255))
            mask = cv2.copyMakeBorder(np.ascontiguousarray(mask), *pad, cv2.BORDER_CONSTANT, value=IGNORE)
        h, w = mask.shape
        fg = None if keep_class is None else mask == keep_class
        total = 0 if fg is None else int(fg.sum())
        best, best_fg = None, -1
        for _ in range(self.tries):
            y = int(torch.randint(0, h - c + 1, ()))
            x = int(torch.randint(0, w - c + 1, ()))
            kept = 0 if fg is None else int(fg[y:y + c, x:x + c].sum())
            if kept > best_fg:
                best, best_fg = (y, x), kept
            if total == 0 or kept >= self.keep * total:
                break
        y, x = best
        return img[y:y + c, x:x + c], mask[y:y + c, x:x + c]


IMAGE_KEYS = ("query", "support", "image")


def to_model(batch: dict, device) -> dict:
    """A training batch as the model takes it, on ``device``: uint8 images normalised there (the same bits
    as ``normalize`` on the CPU), masks as the losses want them (class labels long, support masks float)."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if k in IMAGE_KEYS and v.dtype == torch.uint8:
                v = v.float().div_(255.0).sub_(_MEAN_T.to(device)).div_(_STD_T.to(device))
            elif k in ("query_mask", "query_base", "label"):
                v = v.long()
            elif k == "support_mask":
                v = v.float()
        out[k] = v
    return out


def bam_size(h: int, w: int, size: int) -> tuple[int, int]:
    """The authors' test size (``resized_val: True`` in every PFENet, BAM and SVF config: util/transform.py
    ``Resize``): the longer side always to ``size`` (a smaller image grows), the other truncated, both floored
    to a multiple of 8 (473 -> 472)."""
    nh, nw = (size, int(w * size / h)) if h >= w else (int(h * size / w), size)
    return nh // 8 * 8, nw // 8 * 8


def eval_size(h: int, w: int, size: int, protocol: str = "random") -> tuple[int, int]:
    """The resized (h, w) of a test image: longer side ``size``, aspect kept; BAM's rule for ``bam``."""
    if protocol == "bam":
        return bam_size(h, w, size)
    s = size / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def eval_image(img: torch.Tensor, size: int, protocol: str = "random") -> tuple[torch.Tensor, tuple[int, int]]:
    """The test image [3, H, W] uint8 resized (``eval_size``), padded right/bottom to size x size with
    the mean colour (``bam``: black, no antialiasing, as BAM's test.py) and normalised; returns
    (image [3, size, size] float32, (valid h, valid w)). The resized pixels go straight into one float
    buffer filled with the padding colour, normalised in place: the same bits as resize, pad and
    ``normalize`` one after another, 2.4x faster (1.5 against 3.6 ms for 500x375 -> 473, one core)."""
    nh, nw = eval_size(*img.shape[-2:], size, protocol)
    src = img.float() if protocol == "bam" else img      # the authors resize float32 pixels (no rounding to 8 bits)
    small = TF.resize(tv_tensors.Image(src), [nh, nw], antialias=protocol != "bam").as_subclass(torch.Tensor)
    fill = [0, 0, 0] if protocol == "bam" else MEAN_255
    out = torch.tensor(fill, dtype=torch.float32).view(3, 1, 1).repeat(1, size, size)
    out[:, :nh, :nw] = small
    return _normalize_(out), (nh, nw)


def eval_transform(img: torch.Tensor, mask: torch.Tensor, size: int, protocol: str = "random"):
    """``eval_image`` and its mask: resized (nearest) and padded with the ignore label. Returns
    (normalised image, resized mask, (valid h, valid w))."""
    x, (nh, nw) = eval_image(img, size, protocol)
    mask = TF.resize(tv_tensors.Mask(mask), [nh, nw], interpolation=InterpolationMode.NEAREST)
    mask = TF.pad(mask, [0, 0, size - nw, size - nh], fill=IGNORE)
    return x, mask.as_subclass(torch.Tensor), (nh, nw)


def load_image(path: Path) -> torch.Tensor:
    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except Exception as e:
        raise RuntimeError(f"cannot read image {path}: {e}") from e


def load_label(path: Path) -> torch.Tensor:
    from PIL import Image
    return torch.from_numpy(np.array(Image.open(path), dtype=np.uint8))


def load_pair(root: Path, image_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(image [3,H,W] uint8, class-index label [H,W]) of a prepared image."""
    img = load_image(root / "images" / f"{image_id}.jpg")
    label = load_label(root / "labels" / f"{image_id}.png")
    if label.shape != img.shape[-2:]:
        raise RuntimeError(f"label of {image_id} is {tuple(label.shape)}, its image {tuple(img.shape[-2:])}")
    return img, label


def base_lut(base_classes: list[int]) -> torch.Tensor:
    """Class id -> base-learner label: base classes 1..N in the given order, 255 kept, the rest 0
    (BAM's base annotation: novel classes become background)."""
    lut = torch.zeros(256, dtype=torch.long)
    lut[IGNORE] = IGNORE
    for j, c in enumerate(base_classes):
        lut[c] = j + 1
    return lut


def episodes_possible(pairs_file: str | Path, shots: int) -> bool:
    """Whether some class of the pairs has ``shots + 1`` images (a query and its supports)."""
    return any(len(ids) > shots for ids in images_per_class(read_pairs(pairs_file)).values())


class EpisodeDataset(Dataset):
    """Few-shot episodes over the (image, class) pairs of one fold split.

    ``mode='train'``, augmented with TrainTransform, one epoch being
      * ``sampling='pair'``: one episode per (image, class) pair, the pair being the query;
      * ``sampling='image'`` (PFENet/BAM/SVF, util/dataset.py): one episode per training image, its
        class drawn among the fold's classes present in the image (any pixel count, as the reference
        code draws it; ``class_pixels`` gives the counts).
    ``mode='test'``: ``episodes`` episodes, resized and padded to ``size``, the original-resolution
    label kept for scoring, the query drawn
      * ``protocol='random'``: as a random (image, class) pair;
      * ``protocol='bam'`` (BAM's test.py): the val images in file order, cycling, the class drawn among
        the novel classes present in the image.
    Supports: ``shots`` distinct images holding the episode's class under the pixel rule, none the query.
    ``hue_jitter`` rotates the hue of a training episode's query and supports by one shared random
    amount, so a base class is not always one colour and the head has to compare query with support.
    With ``base_classes`` (BAM), a training episode also carries the query's base-class label
    (``query_base``: base classes renumbered 1..N in that order, other classes 0, 255 kept) and the
    episode's class in that numbering (``base_class``).
    """

    def __init__(self, prepared: str | Path, pairs_file: str | Path, shots: int, mode: str = "train",
                 size: int = 473, seed: int = 0, episodes: int | None = None, scale=(0.9, 1.1), rotate: float = 10.0,
                 sampling: str = "pair", protocol: str = "random", base_classes: list[int] | None = None,
                 hue_jitter: float = 0.0):
        if mode not in ("train", "test"):
            raise ValueError(f"unknown episode mode {mode!r}; choose 'train' or 'test'")
        if sampling not in ("pair", "image") or protocol not in ("random", "bam"):
            raise ValueError(f"unknown sampling {sampling!r} or protocol {protocol!r}")
        self.root = Path(prepared)
        if not (self.root / "images").is_dir():
            raise FileNotFoundError(f"prepared data {self.root} is missing; run `dvc repro prepare` first")
        self.pairs = read_pairs(pairs_file)
        self.shots, self.mode, self.size, self.seed, self.epoch = shots, mode, size, seed, 0
        self.sampling = sampling if mode == "train" else "pair"
        self.protocol = protocol if mode == "test" else "random"
        by_class = images_per_class(self.pairs)
        short = sorted(c for c, ids in by_class.items() if len(ids) < shots + 1)
        if short:
            log.warning("classes %s have fewer than %d images in %s; no %d-shot episode of them can be formed, "
                        "they are skipped", short, shots + 1, pairs_file, shots)
            self.pairs = [(i, c) for i, c in self.pairs if c not in short]
        if not self.pairs:
            raise ValueError(f"{pairs_file}: no class has {shots + 1} images, no {shots}-shot episode can be formed; "
                             f"lower the shot count or add images")
        self.by_class = {c: sorted(ids) for c, ids in by_class.items() if c not in short}
        self.classes = sorted(self.by_class)
        # images in file order, each with the classes an episode may draw for it
        self.images: list[str] = list(dict.fromkeys(i for i, _ in self.pairs))
        self.image_classes = self._image_classes()
        self.episodes = episodes if episodes is not None else len(self.pairs)
        if self.protocol == "bam" and self.episodes < len(self.images):
            log.warning("eval.episodes (%d) is shorter than the val list (%d images): BAM's order covers only its "
                        "first %d images; raise eval.episodes to at least %d to score every image", self.episodes,
                        len(self.images), self.episodes, len(self.images))
        elif self.protocol == "bam" and self.episodes > len(self.images):
            log.warning("the val list %s has %d images, fewer than eval.episodes (%d): BAM's order cycles through it "
                        "%.1f times, so images repeat with other supports; lower eval.episodes to %d to score each "
                        "image once", pairs_file, len(self.images), self.episodes, self.episodes / len(self.images),
                        len(self.images))
        self.train_tf = TrainTransform(size, scale, rotate) if mode == "train" else None
        self.base_lut = base_lut(base_classes) if base_classes else None
        self.hue_jitter = hue_jitter if mode == "train" else 0.0

    def _image_classes(self) -> dict[str, list[int]]:
        """Per image, the classes of this split present in it (any pixel) that can form an episode."""
        if self.sampling != "image" and self.protocol != "bam":
            return {}
        counts_file = self.root / "class_pixels.json"
        if not counts_file.exists():
            raise FileNotFoundError(f"{counts_file} is missing; run `dvc repro prepare`")
        pixels = json.loads(counts_file.read_text())
        members = {c: set(ids) for c, ids in self.by_class.items()}
        out = {}
        for i in self.images:
            present = {int(c) for c, n in pixels.get(i, {}).items() if n > 0}
            # a class can be drawn when enough support images remain once the query itself is set aside
            out[i] = [c for c in self.classes if c in present and len(members[c]) - (i in members[c]) >= self.shots]
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.mode == "train":
            return len(self.images) if self.sampling == "image" else len(self.pairs)
        return self.episodes

    def episode(self, index):
        """(query id, class, support ids, transform seed) of episode ``index``, deterministic from
        (seed, epoch, index). ``index`` may be an (epoch, index) pair, as the training sampler yields."""
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        rng = np.random.default_rng([self.seed, epoch, index])
        if self.mode == "train" and self.sampling == "image":
            qid = self.images[index]
            cls = self.image_classes[qid][int(rng.integers(len(self.image_classes[qid])))]
        elif self.mode == "train":
            qid, cls = self.pairs[index]
        elif self.protocol == "bam":
            qid = self.images[index % len(self.images)]
            cls = self.image_classes[qid][int(rng.integers(len(self.image_classes[qid])))]
        else:
            qid, cls = self.pairs[int(rng.integers(len(self.pairs)))]
        candidates = [i for i in self.by_class[cls] if i != qid]
        sup = [candidates[j] for j in rng.choice(len(candidates), size=self.shots, replace=False)]
        return qid, cls, sup, int(rng.integers(2 ** 31))

    def _pair(self, image_id: str, cls: int | None):
        img, label = load_pair(self.root, image_id)
        return img, (label if cls is None else binarize(label, cls))

    def __getitem__(self, index) -> dict:
        qid, cls, sup_ids, tseed = self.episode(index)
        index = index[1] if isinstance(index, tuple) else index
        q_img, q_lab = self._pair(qid, None if self.mode == "train" else cls)
        sups = [self._pair(s, cls) for s in sup_ids]
        out = {"class": cls, "index": index}
        if self.mode == "train":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(tseed)
                if self.hue_jitter:       # one shift for query and supports (the class keeps one colour), drawn
                    h = self.hue_jitter * (2 * np.random.default_rng([tseed, 1]).random() - 1)   # apart: same crops
                    q_img, sups = TF.adjust_hue(q_img, h), [(TF.adjust_hue(i, h), m) for i, m in sups]
                q, q_lab = self.train_tf(q_img, q_lab, keep_class=cls)
                s = [self.train_tf(i, m) for i, m in sups]
            out.update(query=q, query_mask=binarize(q_lab, cls), support=torch.stack([a for a, _ in s]),
                       support_mask=torch.stack([b for _, b in s]))          # uint8 all: to_model converts
            if self.base_lut is not None:
                out.update(query_base=self.base_lut[q_lab.long()].to(torch.uint8), base_class=int(self.base_lut[cls]))
            return out
        q, qm, valid = eval_transform(q_img, q_lab, self.size, self.protocol)
        s = [eval_transform(i, m, self.size, self.protocol)[:2] for i, m in sups]
        out.update(query=q, query_mask=qm.long(), support=torch.stack([a for a, _ in s]),
                   support_mask=torch.stack([b for _, b in s]).float(), label=q_lab.long(),
                   valid=torch.tensor(valid))
        return out


def steps_per_epoch(n_pairs: int, batch: int, world: int = 1) -> int:
    """Full global batches per epoch (the last incomplete one is dropped)."""
    return max(1, n_pairs // (batch * world))


class EpochBatches(torch.utils.data.Sampler):
    """Batches of (epoch, index) for one epoch of one rank, from step ``start`` on.

    The epoch's order is a permutation seeded by (seed, epoch); global batch b holds positions
    [b*B*W, (b+1)*B*W) and rank r takes its B of them. Starting at any step gives exactly the
    batches an uninterrupted run would have seen, which is what makes resume exact.
    """

    def __init__(self, n: int, batch: int, world: int, rank: int, seed: int, epoch: int, start: int = 0):
        self.batch, self.world, self.rank, self.epoch, self.start = batch, world, rank, epoch, start
        perm = np.random.default_rng([seed, 7919, epoch]).permutation(n)
        per_step = batch * world
        if n < per_step:
            perm = np.resize(perm, per_step)
        self.perm, self.steps = perm, steps_per_epoch(len(perm), batch, world)

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self):
        per_step = self.batch * self.world
        for b in range(self.start, self.steps):
            g = self.perm[b * per_step:(b + 1) * per_step]
            yield [(self.epoch, int(i)) for i in g[self.rank * self.batch:(self.rank + 1) * self.batch]]


class Epochs(torch.utils.data.Sampler):
    """EpochBatches of every epoch from (``epoch``, step ``start``) on, one after another, without end: one
    DataLoader (and its worker processes) serves the whole run."""

    def __init__(self, n: int, batch: int, world: int, rank: int, seed: int, epoch: int, start: int = 0):
        self.args, self.epoch, self.start = (n, batch, world, rank, seed), epoch, start

    def __iter__(self):
        epoch, start = self.epoch, self.start
        while True:
            yield from EpochBatches(*self.args, epoch, start)
            epoch, start = epoch + 1, 0


PREFETCH = 2        # batches each loader worker prepares ahead (DataLoader's prefetch_factor)


def check_shared_memory(dataset, batch: int, workers: int, prefetch: int, section: str, shm: str = "/dev/shm") -> int:
    """Loader workers hand their batches over in shared memory: ``workers`` x ``prefetch`` batches must fit
    in /dev/shm (Docker's default is 64 MB, where a worker would die with a bus error mid-epoch). Returns
    the bytes needed; raises with the numbers and the fix when they do not fit."""
    import shutil
    item = dataset[(0, 0)]
    per_item = sum(v.numel() * v.element_size() for v in item.values() if torch.is_tensor(v))
    need = per_item * batch * workers * prefetch
    if os.path.isdir(shm):
        free = shutil.disk_usage(shm).free
        if need > free:
            raise RuntimeError(f"{shm} has {free / 2 ** 20:.0f} MiB free; {workers} loader workers x {prefetch} batches of "
                               f"{batch} x {per_item / 2 ** 20:.1f} MiB need {need / 2 ** 20:.0f} MiB. Start the container "
                               f"with a larger --shm-size (e.g. {max(1, int(2 * need / 2 ** 30) + 1)}g) or lower "
                               f"{section}.workers")
    return need


def fixed_batches(prepared, pairs_file, size: int, shots_list, per_shots: int = 2, seed: int = 0):
    """Deterministic (query, support, support_mask) batches from the val episodes for parity checks:
    for each shot count, ``per_shots`` batches alternating batch size 1 and 2."""
    out = []
    for k in shots_list:
        if k > 1 and not episodes_possible(pairs_file, k):
            log.warning("no %d-shot val episode can be formed from %s: parity checked without %d-shot batches",
                        k, pairs_file, k)
            continue
        ds = EpisodeDataset(prepared, pairs_file, k, "test", size, seed=seed, episodes=3 * per_shots)
        j = 0
        for n in range(per_shots):
            b = 1 + n % 2
            eps = [ds[j + t] for t in range(b)]
            j += b
            out.append((torch.stack([e["query"] for e in eps]), torch.stack([e["support"] for e in eps]),
                        torch.stack([e["support_mask"] for e in eps])))
    return out
