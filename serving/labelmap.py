"""Many classes in one answer: a query segmented against several support sets becomes one label map.

Each class i (1..N) gives its own two-channel logits for the query; its foreground probability is
p_i = softmax(logits_i)[1] = sigmoid(l1 - l0) at the query's resolution (the logits resized as the
single-class mask is: cropped to the valid region, bilinear, corners aligned). A pixel takes the
class with the highest p_i if that p_i is above the background threshold t, else 0 (background);
ties go to the lower class id. With one class and t = 0.5 this is exactly the single-class mask
(p > 0.5 is l1 > l0). The sigmoid is monotone, so the work is on the logit margins d_i = l1 - l0:
one resize per class and an argmax over N planes.

Forms (the service, serving.predict and the page share them):
  PNG   8-bit palette image, pixel value = class id (0 background), colours of ``PALETTE``
  JSON  {"height", "width", "background_threshold", "classes": [{"id", "name", "area", "rle"}]}, one COCO RLE
        mask per class
"""
from __future__ import annotations

import io
import math
import unicodedata

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.figures import overlay

from .inputs import UserError, rle

MAX_CLASSES = 32
MAX_NAME = 100                    # characters of a class name (it travels in the X-Classes header)
# id 0 black, then well-separated hues (the first six also tell apart for the commonest colour blindness)
PALETTE = [(0, 0, 0), (0, 200, 255), (255, 140, 0), (60, 200, 60), (230, 40, 160), (255, 230, 0), (120, 90, 255),
           (0, 140, 120), (200, 60, 40), (150, 200, 255), (255, 170, 200), (140, 110, 60), (200, 255, 120)]


def color(i: int) -> tuple[int, int, int]:
    """The colour of class ``i`` (ids past the table's end get golden-angle hues)."""
    if i < len(PALETTE):
        return PALETTE[i]
    import colorsys
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)
    return int(255 * r), int(255 * g), int(255 * b)


def same_name(name: str) -> str:
    """What makes two class names one: Unicode's compatibility form, case and runs of white space ignored."""
    return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def check_classes(names: list[str]) -> list[str]:
    """Class names as given, refused when empty, longer than ``MAX_NAME``, the same as another (``same_name``)
    or more than ``MAX_CLASSES``."""
    if not names:
        raise UserError("no class given: name at least one support set or class")
    if len(names) > MAX_CLASSES:
        raise UserError(f"{len(names)} classes given; at most {MAX_CLASSES} in one call")
    seen: dict[str, str] = {}
    for n in names:
        if not n or not n.strip():
            raise UserError("a class name is empty")
        if len(n) > MAX_NAME:
            raise UserError(f"a class name of {len(n)} characters ({n[:40]!r}...); at most {MAX_NAME}")
        key = same_name(n)
        if key in seen:
            same = f"{n!r}" if seen[key] == n else f"{seen[key]!r} and {n!r} (the same up to case, spaces or Unicode form)"
            raise UserError(f"two classes are named {same}: give each class one name (and all its shots under it)")
        seen[key] = n
    return names


def check_background_threshold(t: float) -> float:
    if not (isinstance(t, (int, float)) and math.isfinite(t) and 0 < t < 1):
        raise UserError(f"background_threshold {t!r} is outside (0, 1): a pixel is background unless some class's "
                        "foreground probability is above it (0.5: the single-class rule)")
    return float(t)


def label_map(logits: list[np.ndarray], valid, hw: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """uint8 [H, W] label map at the query's resolution from N classes' logits (each [2, S, S] of the padded
    query, ``valid`` (h, w) of it real). A running argmax: one class's margin at full resolution at a time, so
    memory is three planes whatever N (a 4096^2 query with 32 classes: 3.6 GB when all 32 were stacked)."""
    h, w = int(valid[0]), int(valid[1])
    size = tuple(int(s) for s in hw)
    best = idx = None
    for i, l in enumerate(logits):
        l = np.asarray(l, np.float32)
        d = torch.from_numpy(l[1, :h, :w] - l[0, :h, :w])
        d = F.interpolate(d[None, None], size=size, mode="bilinear", align_corners=True)[0, 0]
        if best is None:
            best, idx = d, torch.zeros(size, dtype=torch.uint8)
            continue
        better = d > best                 # strictly: ties stay with the lower id
        idx.masked_fill_(better, i)
        torch.maximum(best, d, out=best)
        del d, better
    cut = math.log(threshold / (1 - threshold))
    return torch.where(best > cut, idx + 1, 0).to(torch.uint8).numpy()


def label_png(labels: np.ndarray, n: int) -> bytes:
    """The label map as a palette PNG: values are class ids, viewers show the palette's colours."""
    im = Image.frombytes("P", (labels.shape[1], labels.shape[0]), np.ascontiguousarray(labels, np.uint8).tobytes())
    im.putpalette([c for i in range(max(n + 1, 2)) for c in color(i)])
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def label_overlay(image: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """The image with every class filled translucent in its colour and outlined."""
    out = image
    for i in range(1, n + 1):
        if (labels == i).any():
            out = overlay(out, (labels == i).astype(np.uint8), color=color(i))
    return out


def label_json(labels: np.ndarray, names: list[str], threshold: float) -> dict:
    return {"height": int(labels.shape[0]), "width": int(labels.shape[1]), "background_threshold": threshold,
            "classes": [{"id": i, "name": name, "area": int((labels == i).sum()), "rle": rle(labels == i)}
                        for i, name in enumerate(names, 1)]}


def read_label_map(data: bytes, what: str, shape: tuple[int, int], n: int, max_pixels: int) -> np.ndarray:
    """A true label map (a single-channel or palette PNG: 0 background, 1..n the classes in the order given,
    255 ignore), refused with what was found when it holds other values or has another size."""
    from .inputs import _open
    with _open(data, what, max_pixels, "label map") as im:
        if im.mode not in ("L", "P", "1"):
            raise UserError(f"{what} is a {im.mode} image; a label map is single-channel or palette, one class id "
                            "a pixel")
        m = np.asarray(im if im.mode != "1" else im.convert("L")).astype(np.uint8)
    if m.shape != tuple(shape):
        raise UserError(f"{what} is {m.shape[1]}x{m.shape[0]} but its image is {shape[1]}x{shape[0]}")
    bad = sorted(set(np.unique(m).tolist()) - set(range(n + 1)) - {255})
    if bad:
        raise UserError(f"{what} holds the value(s) {bad[:8]}: a label map of {n} classes has 0 (background), 1..{n} "
                        "(the classes in the order given) and 255 (ignore)")
    return m


def score_labels(pred: np.ndarray, truth: np.ndarray, n: int) -> dict:
    """Per class 1..n the intersection and union of a predicted against a true label map, and foreground (any
    class) and background's, 255 ignored; with n = 1 the single-class score (ints rather than lists)."""
    ok = truth != 255
    p, t = pred[ok], truth[ok]
    inter = np.bincount(p[p == t], minlength=n + 1)
    union = np.bincount(p, minlength=n + 1) + np.bincount(t, minlength=n + 1) - inter
    one = (lambda v: int(v[1])) if n == 1 else (lambda v: [int(x) for x in v[1:n + 1]])
    return {"intersection": one(inter), "union": one(union), "fg_intersection": int(((p > 0) & (t > 0)).sum()),
            "fg_union": int(((p > 0) | (t > 0)).sum()), "bg_intersection": int(inter[0]), "bg_union": int(union[0])}
