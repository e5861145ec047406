"""What a request's bytes mean: images and masks decoded as people mean them, and the tensors the model
takes, and the limits of one request. Shared by the service (serving/app.py), the command line
(serving/predict.py) and the MLflow pyfunc (serving/mlflow_model.py).

Images are EXIF-transposed, 16-bit and float greys scaled, masks read from their alpha when they have
one; a mask that is not binary is refused unless a ``threshold`` binarises it (JPEG or anti-aliased
masks from real tools); a mask without any object pixel is refused.
"""
from __future__ import annotations

import io
import re
import zlib

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.data.episodes import eval_image, eval_transform
from pipeline.evaluate import predict_original


class UserError(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------ input decoding
ALPHA_MODES = ("LA", "La", "RGBA", "RGBa", "PA")


class PixelBudget:
    """The pixels one request may still decode (``Limits.max_request_pixels``)."""

    def __init__(self, limit: int):
        self.limit, self.left = limit, limit

    def take(self, n: int, what: str) -> None:
        if n > self.left:
            raise UserError(f"{what} brings the request to more than {self.limit} pixels in all images", 413)
        self.left -= n


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def check_png(data: bytes, what: str) -> None:
    """A PNG's integrity as svf_fss_predict has libpng check it (cpp/src/image.cpp): the CRC of every chunk up to the
    end of the image data (Pillow checks the chunks before the image data, not the image data's own), and the image
    data's zlib stream, Adler-32 checksum included (Pillow stops once it has the rows). Inflated no further than the
    rows the header declares: data beyond them are ignored, as both libraries ignore them."""
    v, pos, idat = memoryview(data), 8, []
    while pos + 12 <= len(v):
        tag, end = bytes(v[pos + 4:pos + 8]), pos + 12 + int.from_bytes(v[pos:pos + 4], "big")
        if end > len(v):
            break                                   # truncated: Pillow says so
        if zlib.crc32(v[pos + 4:end - 4]) != int.from_bytes(v[end - 4:end], "big"):
            raise UserError(f"{what} is a damaged PNG: the CRC of its {tag.decode('latin-1')!r} chunk is wrong")
        if tag == b"IDAT":
            idat.append(v[pos + 8:end - 4])
        elif idat:
            break
        pos = end
    if not idat or v[12:16] != b"IHDR":
        return
    w, h, depth, ctype, interlace = (int.from_bytes(v[16:20], "big"), int.from_bytes(v[20:24], "big"), *v[24:26], v[28])
    bits = depth * {2: 3, 4: 2, 6: 4}.get(ctype, 1)
    left = 1        # the declared rows' bytes (each pass's, interlaced), and one to tell extra data
    for x, y, dx, dy in ADAM7 if interlace else ((0, 0, 1, 1),):
        cols, rows = max(0, (w - x + dx - 1) // dx), max(0, (h - y + dy - 1) // dy)
        left += rows * (1 + (cols * bits + 7) // 8) if cols else 0
    z, rest = zlib.decompressobj(), b"".join(idat)
    try:
        while left > 0 and not z.eof:
            out = z.decompress(rest, min(left, 1 << 20))
            if not out and not rest:
                break
            left, rest = left - len(out), z.unconsumed_tail
    except zlib.error as e:
        raise UserError(f"{what} is a damaged PNG: its image data do not inflate ({e})") from e
    if left > 0 and not z.eof:
        raise UserError(f"{what} is a damaged PNG: its image data end early (no zlib checksum)")


def _open(data: bytes, what: str, max_pixels: int, kind: str = "image", budget: PixelBudget | None = None) -> Image.Image:
    """The decoded image, EXIF orientation applied, its pixel count checked before decoding (a
    decompression bomb is a 413 like any image over the limit)."""
    if not data:
        raise UserError(f"{what} is empty")
    try:
        im = Image.open(io.BytesIO(data))
        if im.width * im.height > max_pixels:
            raise UserError(f"{what} has {im.width}x{im.height} pixels, more than the limit of {max_pixels}",
                            413)
        if budget is not None:
            budget.take(im.width * im.height, what)
        if im.format == "PNG":
            check_png(data, what)
        im.load()
        return ImageOps.exif_transpose(im)
    except UserError:
        raise
    except Image.DecompressionBombError as e:
        raise UserError(f"{what} declares more pixels than the limit of {max_pixels} ({e})", 413) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{what} is not a readable {kind} ({type(e).__name__})") from e


def to_rgb8(im: Image.Image) -> np.ndarray:
    """RGB uint8 of any mode: 16-bit greys scaled by 65535 (not clipped at 255), 32-bit integer greys
    by 65535 when they exceed 255, float greys taken as 0..1 (or 0..255 when above 1)."""
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
            a = a / 65535.0 * 255.0
        elif im.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        g = np.clip(np.round(a), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    return np.array(im.convert("RGB"))


def read_image(data: bytes, what: str, max_pixels: int, budget: PixelBudget | None = None) -> np.ndarray:
    with _open(data, what, max_pixels, budget=budget) as im:
        return to_rgb8(im)


def _mask_plane(im: Image.Image) -> np.ndarray:
    """The mask's values: the alpha channel where the image has one that is not fully opaque (an
    object cut out on a transparent background), else the grey or palette-index plane."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ALPHA_MODES:
        alpha = np.asarray(im.getchannel("A"))
        if (alpha < 255).any():
            return alpha
        im = im.convert("L")
    if im.mode not in ("L", "P", "1", "I", "I;16"):
        im = im.convert("L")
    m = np.array(im)
    return m.astype(np.uint8) if m.dtype == bool else m


def read_mask(data: bytes, what: str, shape: tuple[int, int], max_pixels: int,
              threshold: float | None = None, need_object: bool = True) -> np.ndarray:
    """A binary mask: values {0,1} (255 = ignore allowed) or {0,255}; with an alpha channel, the alpha.
    Any other values (a JPEG or anti-aliased mask) are refused, or with ``threshold`` (0 < t < 1)
    binarised: object where the value is at least t of white. Returns uint8 with 1 object,
    0 background, 255 ignore. A mask without any object pixel (empty, or all 255) is refused: a
    support must show its object."""
    with _open(data, what, max_pixels, "mask image") as im:
        m = _mask_plane(im)
    if m.ndim != 2:
        raise UserError(f"{what} must be a single-channel image")
    if m.shape != shape:
        raise UserError(f"{what} is {m.shape[1]}x{m.shape[0]} but its image is {shape[1]}x{shape[0]}")
    return binary_mask(m, what, threshold, need_object=need_object)


def binary_mask(m: np.ndarray, what: str, threshold: float | None = None,
                hint: str = "mask_threshold (e.g. 0.5) to binarise a JPEG or anti-aliased mask",
                need_object: bool = True) -> np.ndarray:
    """The rules of a support mask, for a decoded image (/v1) or a tensor (/v2): values {0,1} (255 = ignore)
    or {0,255}; others refused (or, with ``threshold``, binarised); at least one object pixel. Returns uint8
    with 1 object, 0 background, 255 ignore."""
    values = set(np.unique(m).tolist())
    if values == {255}:
        raise UserError(f"{what} holds only the value 255: all ignore in the 0/1/255 encoding, so it marks no object; "
                        "mark the object 1 (or 255 on a 0 background)")
    if values <= {0, 255}:
        out = (m == 255).astype(np.uint8)
    elif values <= {0, 1, 255}:
        out = m.astype(np.uint8)
    elif threshold is not None:
        white = 65535 if m.dtype == np.uint16 or max(values) > 255 else 255
        out = (m >= threshold * white).astype(np.uint8)
    else:
        bad = sorted(values - {0, 1, 255}, key=str)[:5]
        raise UserError(f"{what} is not binary: it holds values {bad}; use 0/1 (255 = ignore) or 0/255"
                        + (f", or give {hint}" if hint else ""))
    if need_object and not (out == 1).any():
        raise UserError(f"{what} marks no object pixel (all background); a support must show its object")
    return out


def check_threshold(threshold: float | None) -> float | None:
    if threshold is not None and not 0 < threshold < 1:
        raise UserError(f"mask_threshold {threshold} is outside (0, 1): it is the fraction of white from which a "
                        "mask pixel is object, e.g. 0.5")
    return threshold


# ------------------------------------------------------------------ one request's rules, for every entry point
# the service's defaults (serving/app.py's Limits); the MLflow pyfunc applies them as they are
MAX_SHOTS = 10
MAX_PIXELS = 4096 * 4096                  # per image
MAX_REQUEST_PIXELS = 4 * MAX_PIXELS       # all images of one request together
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_set_name(name: str) -> str:
    """A support set's name: 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit (it names
    the set's file in the store, serving/store.py)."""
    if not isinstance(name, str) or not SET_NAME.fullmatch(name):
        name = str(name)
        raise UserError(f"support-set name {name[:64]!r}{'...' if len(name) > 64 else ''} is not allowed: 1 to 64 "
                        "letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def check_shots(supports: int, masks: int, max_shots: int = MAX_SHOTS, model_shots: int | None = None) -> None:
    """One class's shots: at least one, at most ``max_shots``, one mask per support image, and exactly
    ``model_shots`` for a model that takes one shot count (BAM trained with K > 1)."""
    if not supports:
        raise UserError("at least one support image is needed (zero shots given)")
    if supports > max_shots:
        raise UserError(f"{supports} shots given; at most {max_shots} are accepted")
    if masks != supports:
        raise UserError(f"{supports} support image(s) and {masks} mask(s); give one mask per support")
    if model_shots and supports != model_shots:
        raise UserError(f"{supports} shots given; this model (BAM trained with {model_shots} shots) takes exactly "
                        f"{model_shots}")


def prepare_supports(blobs, size: int, max_pixels: int, budget: PixelBudget, threshold: float | None):
    """(support [1,K,3,S,S], masks [1,K,S,S], the masks' metadata) from [(what, image bytes, mask what, mask
    bytes)]: every image within ``max_pixels`` and counted in the request's ``budget``, every mask by
    ``read_mask``'s rules."""
    images, masks, meta = [], [], []
    for what, data, mwhat, mdata in blobs:
        img = read_image(data, what, max_pixels, budget)
        m = read_mask(mdata, mwhat, img.shape[:2], max_pixels, threshold)
        images.append(img)
        masks.append(m)
        meta.append({"file": what, "height": int(m.shape[0]), "width": int(m.shape[1]),
                     "object_pixels": int((m == 1).sum()), "ignore_pixels": int((m == 255).sum())})
    return (*support_tensors(images, masks, size), meta)


def mask_rule(m: np.ndarray, threshold: float | None = None) -> str:
    """Which of ``binary_mask``'s rules reads the plane ``m``, in words (to tell people how their masks were
    taken)."""
    values = set(np.unique(m).tolist())
    if values == {0}:
        return "all background"
    if values <= {0, 255}:
        return "0/255: 255 object"
    if values <= {0, 1, 255}:
        return "0/1: 255 ignore"
    return f"binarised at {threshold} of white"


def read_truth_mask(data: bytes, what: str, shape: tuple[int, int], max_pixels: int, threshold: float | None = None,
                    hint: str = "") -> tuple[np.ndarray, str]:
    """A true mask by a support mask's rules (``binary_mask``: 0/1 with 255 ignore, or 0/255 with 255 object;
    others only with ``threshold``), but it may be empty; returns (uint8 1 object, 0 background, 255 ignore;
    the rule that read it, ``mask_rule``)."""
    with _open(data, what, max_pixels, "mask image") as im:
        m = _mask_plane(im)
    if m.ndim != 2:
        raise UserError(f"{what} must be a single-channel image")
    if m.shape != tuple(shape):
        raise UserError(f"{what} is {m.shape[1]}x{m.shape[0]} but its image is {shape[1]}x{shape[0]}")
    return binary_mask(m, what, threshold, hint=hint, need_object=False), mask_rule(m, threshold)


def rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(x) for x in r["size"]], "counts": r["counts"].decode("ascii")}


def support_tensors(images: list[np.ndarray], masks: list[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(support [1,K,3,S,S], support_mask [1,K,S,S]) as the model takes them, from RGB uint8 images and
    their 0/1/255 masks."""
    xs, ms = [], []
    for img, m in zip(images, masks):
        x, mm, _ = eval_transform(torch.from_numpy(img).permute(2, 0, 1), torch.from_numpy(m), size)
        xs.append(x.numpy())
        ms.append((mm == 1).float().numpy())
    return np.stack(xs)[None], np.stack(ms)[None]


def query_tensor(img: np.ndarray, size: int) -> tuple[np.ndarray, list]:
    """(query [1,3,S,S], the valid (h, w) inside the padded square)."""
    x, valid = eval_image(torch.from_numpy(img).permute(2, 0, 1), size)
    return x.numpy()[None], valid


def mask_of(logits: np.ndarray, valid, hw: tuple[int, int]) -> np.ndarray:
    """The 0/1 mask at the query's own resolution from one episode's logits [2,S,S]."""
    return predict_original(torch.from_numpy(np.array(logits, np.float32)), valid, hw).numpy().astype(np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    """PNG at zlib level 1: 8x faster than the default on a ragged mask (0.18 against 1.4 ms at 128x128),
    about a quarter bigger."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG", compress_level=1)
    return buf.getvalue()
