"""Label Studio's brush regions: the @thi.ng/rle-pack bit stream of an image's RGBA bytes, as its editor and
label-studio-sdk's converter write it.

A stream is a 53-bit header (value count, word size, the four run-length widths), then chunks: flag 1 = a
repeat (width selector, length - 1, one word), flag 0 = a literal (width selector, length - 1, that many
words); MSB first, zero-padded to whole bytes. A region's declared count is checked against its image
(``expected``) before anything is allocated, so a 55 kB stream claiming 2^30 values costs nothing; the
decoder reads the stream as one bit string (a literal run in one conversion), about 1 s per 10^6 chunks on
one core, and callers run it off the event loop.
"""
from __future__ import annotations

import hashlib

import numpy as np

from ..inputs import UserError

RLE_SIZES = (3, 4, 8, 16)          # rle-pack's run-length field widths, as Label Studio's editor writes them


def rle_encode(values: np.ndarray) -> list[int]:
    """The rle-pack stream (8-bit words) of a flat uint8 array, byte for byte as label-studio-sdk's converter
    writes it: a run of one is a one-word literal chunk; a run of up to 256 takes the narrowest width that
    holds it; a longer run goes in 16-bit chunks of 65,536, the rest in a last 16-bit chunk; then 1 to 8 zero
    bits (a whole zero byte when the stream already ends on a byte)."""
    v = np.asarray(values, np.uint8).ravel()
    parts = [format(len(v), "032b"), format(7, "05b")] + [format(s - 1, "04b") for s in RLE_SIZES]
    if len(v):
        starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
        lengths = np.diff(np.r_[starts, len(v)])
        for start, n in zip(starts.tolist(), lengths.tolist()):
            word = format(int(v[start]), "08b")
            if n == 1:
                parts.append("000000" + word)          # flag 0, selector 0, length 0: one literal word
                continue
            sel = next((i for i, s in enumerate(RLE_SIZES[:3]) if n <= 1 << s), 3)
            while n > 1 << 16:
                parts.append("111" + "1" * 16 + word)
                n -= 1 << 16
            parts.append("1" + format(sel, "02b") + format(n - 1, f"0{RLE_SIZES[sel]}b") + word)
    bits = "".join(parts)
    bits += "0" * (8 - len(bits) % 8)
    return list(int(bits, 2).to_bytes(len(bits) // 8, "big"))


def rle_decode(rle, expected: int | None = None) -> np.ndarray:
    """The flat uint8 array of an rle-pack stream (any run-length widths, repeat and literal chunks); with
    ``expected``, a stream declaring another count is refused before its values are read."""
    try:
        data = bytes(rle)
    except (TypeError, ValueError) as e:
        raise UserError("the brush RLE is not a list of byte values (0 to 255)") from e
    if len(data) < 7:
        raise UserError("the brush RLE is shorter than its header")
    bits = bin(int.from_bytes(data, "big") | 1 << 8 * len(data))[3:]      # the leading 1 keeps the zeros
    pos = 53
    num, word = int(bits[:32], 2), int(bits[32:37], 2) + 1
    sizes = [int(bits[37 + 4 * i:41 + 4 * i], 2) + 1 for i in range(4)]
    if word != 8:
        raise UserError(f"the brush RLE has {word}-bit words; Label Studio writes 8")
    if expected is not None and num != expected:
        raise UserError(f"the brush RLE declares {num} values; its image has {expected} (width x height x 4)")
    out = np.empty(num, np.uint8)
    i, end = 0, len(bits)
    while i < num:
        if pos + 3 > end:
            raise UserError("the brush RLE ends in the middle of a chunk")
        flag, w = bits[pos] == "1", sizes[int(bits[pos + 1:pos + 3], 2)]
        head = pos + 3 + w
        n = int(bits[pos + 3:head] or "0", 2) + 1
        stop = head + (8 if flag else 8 * n)
        if stop > end:
            raise UserError("the brush RLE ends in the middle of a chunk")
        if i + n > num:
            raise UserError(f"the brush RLE holds more than its {num} values")
        if flag:
            out[i:i + n] = int(bits[head:stop], 2)
        else:
            out[i:i + n] = np.frombuffer(int(bits[head:stop], 2).to_bytes(n, "big"), np.uint8)
        i, pos = i + n, stop
    return out


def brush_mask(result: dict, image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The 0/1 mask [H, W] of one brushlabels result item (painted where the RGBA's alpha is non-zero); with
    ``image_hw``, a region of another size is refused before it is decoded."""
    value = result.get("value") or {}
    h, w = int(result.get("original_height") or 0), int(result.get("original_width") or 0)
    if value.get("format") != "rle" or not isinstance(value.get("rle"), list):
        raise UserError("a brush region without RLE (value.format 'rle', value.rle)")
    if h <= 0 or w <= 0:
        raise UserError(f"a brush region of {w}x{h} pixels")
    if image_hw is not None and (h, w) != tuple(image_hw):
        raise UserError(f"a brush region is {w}x{h} but its image is {image_hw[1]}x{image_hw[0]}")
    flat = rle_decode(value["rle"], h * w * 4)
    return (flat.reshape(h, w, 4)[:, :, 3] > 0).astype(np.uint8)


def brush_results(labels: np.ndarray, names: list[str], from_name: str, to_name: str) -> list[dict]:
    """One brushlabels region per class present in a label map (serving/labelmap.py), in Label Studio's form."""
    h, w = labels.shape
    out = []
    for i, name in enumerate(names, 1):
        m = labels == i
        if m.any():
            out.append({"id": hashlib.sha1(name.encode()).hexdigest()[:10], "from_name": from_name,
                        "to_name": to_name, "type": "brushlabels", "original_width": w, "original_height": h,
                        "image_rotation": 0, "value": {"format": "rle", "brushlabels": [name],
                                                       "rle": rle_encode(np.repeat(m.ravel() * np.uint8(255), 4))}})
    return out
