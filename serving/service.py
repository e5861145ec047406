"""What the service's routes share (``Service``, handed to each route by the ``service`` dependency): the
limits, the model once loaded, the batcher, the support-set store, the worker pool that reads images off
the event loop; and a query's image work, from the request's bytes to the response.
"""
from __future__ import annotations

import asyncio
import io
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request, UploadFile
from fastapi.responses import Response
from PIL import Image

from pipeline.figures import overlay

from .backends import Backend
from .inputs import (PixelBudget, UserError, check_shots, check_threshold, mask_of, png_bytes,
                     prepare_supports, query_tensor, read_image, rle)
from .labelmap import label_json, label_map, label_overlay, label_png

def prepare_query(data: bytes, what: str, size: int, max_pixels: int, budget: PixelBudget, fmt: str, classes: int = 0):
    """(query tensor, valid region, what ``answer`` needs: the image for an overlay, else its size). With
    ``classes``, the label map's planes (one per class at the query's resolution) are taken from the budget
    from the image's header, before it is decoded."""
    if classes:
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        except Exception:           # not an image: read_image says so
            w = h = 0
        budget.take(w * h * classes, f"the label map ({classes} classes at {w}x{h})")
    img = read_image(data, what, max_pixels, budget)
    x, valid = query_tensor(img, size)
    return x, valid, img if fmt == "overlay" else img.shape[:2]


def answer(logits, valid, image_or_hw, fmt: str, backend_name: str):
    """The response of one query from its logits: a PNG (the mask or the overlay) or the JSON body."""
    hw = image_or_hw.shape[:2] if fmt == "overlay" else image_or_hw
    mask = mask_of(logits[0], valid, hw)
    area = int(mask.sum())
    if fmt == "png":
        return Response(png_bytes(mask * 255), media_type="image/png", headers={"X-Foreground-Area": str(area)})
    if fmt == "overlay":
        return Response(png_bytes(overlay(image_or_hw, mask)), media_type="image/png",
                        headers={"X-Foreground-Area": str(area)})
    return {"height": hw[0], "width": hw[1], "area": area, "rle": rle(mask), "backend": backend_name}


def answer_labels(logits, valid, image_or_hw, fmt: str, names: list[str], threshold: float, backend_name: str):
    """The response of a label-map request (serving/labelmap.py)."""
    hw = image_or_hw.shape[:2] if fmt == "overlay" else image_or_hw
    labels = label_map(logits, valid, hw, threshold)
    header = {"X-Classes": json.dumps(names, ensure_ascii=True)}
    if fmt == "png":
        return Response(label_png(labels, len(names)), media_type="image/png", headers=header)
    if fmt == "overlay":
        return Response(png_bytes(label_overlay(image_or_hw, labels, len(names))), media_type="image/png",
                        headers=header)
    return {**label_json(labels, names, threshold), "backend": backend_name}



class Service:
    def __init__(self, limits, workers: int):
        self.limits = limits
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="svf-io")
        self.state: dict = {"ready": False}       # backend, batcher, store, feature_shapes once loaded
        self.registry: Any = None                    # the Prometheus registry /metrics reads (create_app)

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def backend(self) -> Backend:
        if not self.state["ready"]:
            raise UserError("the model is still loading", 503)
        return self.state["backend"]

    @property
    def store(self):
        return self.state["store"]

    async def encode(self, s, m):
        return await asyncio.get_running_loop().run_in_executor(None, self.backend().encode, s, m)

    async def decode(self, x, feats):
        try:
            return await self.state["batcher"].decode(x, feats)
        except asyncio.TimeoutError:
            raise UserError(f"inference took longer than {self.limits.timeout_s} s", 504) from None

    async def read_supports(self, supports: list[UploadFile], masks: list[UploadFile], budget: PixelBudget,
                            threshold: float | None = None, what: str = ""):
        """(support, masks, metadata) of one class; ``what`` prefixes every error (which class)."""
        try:
            return await self._read_supports(supports, masks, budget, threshold)
        except UserError as e:
            if not what:
                raise
            raise UserError(what + str(e), e.status) from e

    async def _read_supports(self, supports, masks, budget, threshold):
        b, limits = self.backend(), self.limits
        check_threshold(threshold)
        check_shots(len(supports), len(masks), limits.max_shots, b.shots)
        blobs = [(f"support {i + 1} ({f.filename})", await f.read(), f"mask {i + 1} ({mf.filename})", await mf.read())
                 for i, (f, mf) in enumerate(zip(supports, masks))]
        return await self.off_loop(prepare_supports, blobs, b.size, limits.max_pixels, budget, threshold)

    async def prepare_query(self, query: UploadFile, fmt: str, budget: PixelBudget, classes: int = 0):
        return await self.off_loop(prepare_query, await query.read(), f"query ({query.filename})", self.backend().size,
                                   self.limits.max_pixels, budget, fmt, classes)

    async def run_query(self, query: UploadFile, feats, fmt: str, budget: PixelBudget):
        x, valid, kept = await self.prepare_query(query, fmt, budget)
        logits = await self.decode(x, feats)
        return await self.off_loop(answer, logits, valid, kept, fmt, self.backend().name)


def service(request: Request) -> Service:
    """The dependency that hands a route the service's shared state."""
    return request.app.state.service


async def one_query(request: Request) -> None:
    """A form with two `query` parts would silently segment the last: refuse it (the form is parsed already)."""
    n = len((await request.form()).getlist("query"))
    if n > 1:
        raise UserError(f"the form has {n} query parts; send one query per request (or a batch through /v2)")


def owned(request: Request, name: str) -> tuple[str, str]:
    """Support sets belong to the API key that registered them: another key never sees them."""
    return request.scope.get("svf.owner", ""), name
