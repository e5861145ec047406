"""The inference service (FastAPI): few-shot segmentation over the exported model.

POST /v1/segment                      query + k supports + k masks (multipart) -> PNG mask, overlay PNG or JSON (COCO RLE)
PUT  /v1/support-sets/{name}          register a support set: its features are computed once and cached
POST /v1/support-sets/{name}/segment  segment a query against a registered set
POST /v1/label-map                    one query against several classes (registered sets and/or inline) -> label map
DELETE /v1/support-sets/{name}
GET  /ui                               a page to segment in the browser (serving/ui.html)
GET  /healthz (liveness)  /readyz (model loaded and warmed up)  /metrics (Prometheus)
/v2/...                               the Open Inference Protocol (KServe v2 / Triton HTTP): serving/kserve.py

API keys, Host check, streaming body limit and in-flight limit: serving/guard.py, in front of the app.
Every error answers {"error": "..."} (the framework's too); how images and masks are read:
serving/inputs.py (``mask_threshold`` binarises JPEG or anti-aliased masks).
Inference runs in a worker thread behind a micro-batcher that stacks concurrent requests with the
same shot count into one backend call.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi_offline import FastAPIOffline
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.routing import Match
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from pipeline.figures import overlay

from .backends import Backend, load_backend
from .guard import Guard
from .kserve import add_routes as add_open_inference_routes
from .labelmap import check_background_threshold, check_classes, color, label_json, label_map, label_overlay, label_png
from .inputs import (PixelBudget, UserError, check_threshold, mask_of, png_bytes, query_tensor, read_image, read_mask,
                     rle, support_tensors)
from .threads import share_fairly
from .store import QuotaError, SupportStore, feature_shapes, fingerprint

log = logging.getLogger(__name__)


@dataclass
class Limits:
    max_upload_bytes: int = 20 * 1024 * 1024      # whole request body, counted while it streams
    max_pixels: int = 4096 * 4096                # per image
    max_request_pixels: int = 4 * 4096 * 4096    # all images of one request together
    max_inflight: int = 64                       # /v1 requests at once; the next answers 503 + Retry-After
    body_timeout_s: float = 60.0                 # the whole body must arrive within this (408 otherwise)
    max_shots: int = 10
    timeout_s: float = 30.0
    max_batch: int = 8
    batch_window_ms: float = 5.0
    max_json_bytes: int = 2 * 1024 * 1024        # /v2 JSON parsed or written (binary tensors beyond it; kserve.py)


# image worker threads: the CPUs, at most 4 (README, "Figures": on 2 cores 2 served more than 4)
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
Format = Literal["png", "json", "overlay"]


class RLE(BaseModel):
    size: list[int]
    counts: str


class SegmentJSON(BaseModel):
    """format=json: the mask at the query's resolution as COCO RLE (pycocotools.mask.decode reads it)."""
    height: int
    width: int
    area: int
    rle: RLE
    backend: str


class ErrorBody(BaseModel):
    error: str


class LabelClass(BaseModel):
    id: int
    name: str
    area: int
    rle: RLE


class LabelMapJSON(BaseModel):
    """format=json of /v1/label-map: one COCO RLE mask per class (serving/labelmap.py)."""
    height: int
    width: int
    background_threshold: float
    classes: list[LabelClass]
    backend: str


SEGMENT_RESPONSES = {
    200: {"description": "format=png (default): the mask as a PNG at the query's resolution, 0 background and 255 "
                         "object, its area in the X-Foreground-Area header; format=overlay: the query as a PNG with the "
                         "mask filled translucent cyan and outlined; format=json: the mask as COCO RLE.",
          "content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                      "application/json": {"schema": SegmentJSON.model_json_schema()}}},
    **{code: {"model": ErrorBody, "description": what} for code, what in (
        (400, "an input that cannot be used (unreadable image, mask of another size, no object in a mask, ...)"),
        (401, "API key missing or wrong (when the service has keys)"), (404, "no support set of that name"),
        (408, "the body did not arrive in time"), (413, "too many bytes or pixels"),
        (422, "a field missing or of the wrong type (format outside png/json/overlay, mask_threshold outside (0, 1))"),
        (503, "model loading, or too many requests in progress (Retry-After)"), (504, "inference timed out"))},
}
LABEL_MAP_RESPONSES = {
    200: {"description": "format=png (default): the label map as a palette PNG at the query's resolution, pixel value = "
                         "class id (1 = the first class given, 0 background), the class names in order in the X-Classes "
                         "header (JSON); format=overlay: the query with each class filled in its colour; format=json: "
                         "one COCO RLE mask per class.",
          "content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                      "application/json": {"schema": LabelMapJSON.model_json_schema()}}},
    **{k: v for k, v in SEGMENT_RESPONSES.items() if k != 200}}


# ------------------------------------------------------------------ batching
@dataclass
class Pending:
    """One query waiting for the backend: its tensor, its set's features, the future its request awaits and
    when it arrived (the event loop's clock)."""
    query: np.ndarray
    feats: tuple
    future: asyncio.Future
    arrived: float


class Batcher:
    """Runs concurrent decode requests as one backend call per shot count. A batch closes when it is
    full or when its oldest request has waited ``batch_window_ms`` since it arrived: requests that
    queued while the backend was busy have waited already and go at once, so the backend never idles
    on a window while work is waiting (counted from when the batcher took a request, the window kept
    the backend idle for up to 5 ms after every call); only a request reaching an idle backend waits
    for company."""

    def __init__(self, backend: Backend, limits: Limits, batch_hist):
        self.backend, self.limits, self.batch_hist = backend, limits, batch_hist
        self.queue: asyncio.Queue | None = None
        self.task = None

    def start(self):
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self):
        if self.task:
            self.task.cancel()

    async def decode(self, query: np.ndarray, feats) -> np.ndarray:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.queue.put_nowait(Pending(query, feats, fut, loop.time()))
        return await asyncio.wait_for(fut, timeout=self.limits.timeout_s)

    def _decode(self, queries: list, feats: list) -> np.ndarray:
        """One backend call for the batch; the stacking too runs off the event loop (at 473 px a batch of
        8 queries is 21 MB to copy)."""
        if self.backend.cpu_torch:
            share_fairly(torch)
        return self.backend.decode(np.concatenate(queries, 0), Backend.batch_features(feats))

    async def collect(self) -> list[Pending]:
        """The next batch: the oldest request, what else is queued, and until the oldest's window closes
        whatever arrives, up to ``max_batch``."""
        loop = asyncio.get_running_loop()
        items = [await self.queue.get()]
        deadline = items[0].arrived + self.limits.batch_window_ms / 1000
        while len(items) < self.limits.max_batch:
            if not self.queue.empty():
                items.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return items

    async def _loop(self):
        loop = asyncio.get_running_loop()
        while True:
            groups: dict = {}
            for p in await self.collect():
                groups.setdefault(tuple(f.shape[1:] for f in p.feats), []).append(p)
            for group in groups.values():
                live = [p for p in group if not p.future.done()]
                if not live:
                    continue
                self.batch_hist.observe(len(live))
                try:
                    out = await loop.run_in_executor(None, self._decode, [p.query for p in live],
                                                     [p.feats for p in live])
                    for i, p in enumerate(live):
                        if not p.future.done():
                            p.future.set_result(out[i:i + 1])
                except Exception as e:    # a backend failure answers those requests, the loop goes on
                    if len(live) == 1:
                        log.exception("batch failed")
                        if not live[0].future.done():
                            live[0].future.set_exception(e)
                        continue
                    # one request's set may be what failed: each alone, so that only its own request fails
                    log.warning("a batch of %d failed (%s); running its requests one by one", len(live), e)
                    for p in live:
                        try:
                            out = await loop.run_in_executor(None, self._decode, [p.query], [p.feats])
                            if not p.future.done():
                                p.future.set_result(out)
                        except Exception as one:
                            log.exception("request failed")
                            if not p.future.done():
                                p.future.set_exception(one)


class Measured:
    """Counts and times every request (``observe(scope, status, seconds)``); an unhandled error answers
    500 {"error"} and the service goes on. Plain ASGI: the framework's "http" middleware costs a task
    group and two memory streams per request."""

    def __init__(self, app, observe):
        self.app, self.observe = app, observe

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t, status = time.perf_counter(), [None]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        except Exception:   # never a dead worker; report and go on
            log.exception("unhandled error")
            if status[0] is None:
                await JSONResponse({"error": "internal error"}, status_code=500)(scope, receive, send_status)
        self.observe(scope, status[0] or 500, time.perf_counter() - t)


# ------------------------------------------------------------------ a query's image work (the worker pool's)
def prepare_query(data: bytes, what: str, size: int, max_pixels: int, budget: PixelBudget, fmt: str):
    """(query tensor, valid region, what ``answer`` needs: the image for an overlay, else its size)."""
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


def share_cpu(backend: Backend) -> None:
    """How the process divides the CPU between the model and the image work, set once at start-up."""
    if backend.kind in ("onnxruntime", "tensorrt") or getattr(getattr(backend, "device", None), "type", "") == "cuda":
        # the image work's torch operators run one thread each: the worker pool is their parallelism, and
        # the model keeps its own threads (ONNX Runtime) or runs on the GPU. With this and the batch
        # stacked off the loop, CPU per request fell from 47.6 to 37.5 ms (16-core H100 machine, 473 px)
        torch.set_num_threads(1)
    # the event loop, the image workers and the backend's thread take turns at Python's lock; a thread
    # back from a system call or from the model waited up to the default 5 ms for a busy one to let go.
    # At 1 ms, with --workers at the CPUs: 2 cores, registered set at 16 clients, +7% requests per second
    # over five alternating runs (README, "Figures")
    sys.setswitchinterval(0.001)


# ------------------------------------------------------------------ app
def create_app(model_dir: str | Path, backend: str = "auto", limits: Limits | None = None, keys=(),
               allowed_hosts=("*",), cors_origins=(), workers: int = DEFAULT_WORKERS, store: str | Path | None = None,
               max_sets: int = 100, max_set_bytes: int = 256 << 20) -> FastAPI:
    """The service over ``model_dir``. ``keys``: API keys (none: open); ``allowed_hosts``: Host header
    names; ``cors_origins``: browser origins allowed (none: no CORS headers); ``workers``: the bounded
    pool that decodes, preprocesses and encodes images off the event loop; ``store``: the folder where
    registered support sets persist (None: memory only), ``max_sets`` / ``max_set_bytes`` per key."""
    limits = limits or Limits()
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="svf-io")

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    registry = CollectorRegistry()
    requests = Counter("svf_requests_total", "Requests by endpoint and status", ["endpoint", "status"],
                       registry=registry)
    latency = Histogram("svf_request_latency_seconds", "Request latency", ["endpoint"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    batch_sizes = Histogram("svf_batch_size", "Queries per backend call", registry=registry,
                            buckets=(1, 2, 4, 8, 16, 32))
    # API docs (/docs, /redoc) served from the fastapi-offline package's copies of Swagger UI and
    # ReDoc instead of a CDN: the pages work on a machine without internet.
    app = FastAPIOffline(title="svf-fss", version="0.1.0",
                  description="Few-shot segmentation (PFENet + SVF) over the exported model.")
    state = {"ready": False}

    @app.on_event("startup")
    async def _startup():
        b = await asyncio.get_running_loop().run_in_executor(None, load_backend, Path(model_dir), backend)
        state["backend"] = b
        share_cpu(b)
        state["batcher"] = Batcher(b, limits, batch_sizes)
        state["batcher"].start()
        s = b.size
        x = np.zeros((1, 3, s, s), np.float32)
        k = b.shots or 1
        feats = b.encode(np.zeros((1, k, 3, s, s), np.float32), np.ones((1, k, s, s), np.float32))
        b.decode(x, feats)    # warm-up
        state["feature_shapes"] = feature_shapes(b) or []
        state["store"] = SupportStore(store, fingerprint(b.kind, b.files), max_sets, max_set_bytes,
                                      state["feature_shapes"] or None)
        loaded, refused = state["store"].load()
        if store:
            log.info("support sets: %d reloaded from %s, %d refused", loaded, store, len(refused))
        # the model's and libraries' objects (millions) leave the collector's view: a full collection
        # under load then walks only what requests create, not a pause of ~100 ms that stalls /healthz
        gc.collect()
        gc.freeze()
        state["ready"] = True
        log.info("ready: backend %s, input %dx%d", b.name, s, s)

    @app.on_event("shutdown")
    async def _shutdown():
        if "batcher" in state:
            await state["batcher"].stop()
        pool.shutdown(wait=False)

    def route_template(scope) -> str:
        """The matched route's template (``/v1/support-sets/{name}``), so that metrics have one label per
        route however many paths clients invent; every unknown path is ``unmatched``."""
        route = scope.get("route")      # set by the router on its way in
        if route is not None:
            return route.path
        for route in app.router.routes:     # refused before routing (serving/guard.py)
            if route.matches(scope)[0] == Match.FULL:
                return route.path
        return "unmatched"

    def observe(scope, status: int, seconds: float) -> None:
        endpoint = route_template(scope)
        requests.labels(endpoint, str(status)).inc()
        latency.labels(endpoint).observe(seconds)

    @app.exception_handler(UserError)
    async def _user_error(_request, exc: UserError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        """Errors raised inside the framework (an unparsable multipart body, too many parts, an unknown
        path) keep the service's one error shape."""
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, exc: RequestValidationError):
        msgs = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', []))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": f"bad request: {msgs}"}, status_code=422)

    def check_name(name: str) -> None:
        if not NAME_RULE.fullmatch(name):
            raise UserError(f"support-set name {name[:64]!r}{'...' if len(name) > 64 else ''} is not allowed: 1 to 64 "
                            "letters, digits, '.', '_' or '-', starting with a letter or digit")

    def backend_or_503() -> Backend:
        if not state["ready"]:
            raise UserError("the model is still loading", 503)
        return state["backend"]

    async def read_supports(supports: list[UploadFile], masks: list[UploadFile], budget: PixelBudget,
                            threshold: float | None = None, what: str = ""):
        """(support, masks, metadata) of one class; ``what`` prefixes every error (which class)."""
        try:
            return await _read_supports(supports, masks, budget, threshold)
        except UserError as e:
            if not what:
                raise
            raise UserError(what + str(e), e.status) from e

    async def _read_supports(supports, masks, budget, threshold):
        b = backend_or_503()
        check_threshold(threshold)
        if not supports:
            raise UserError("at least one support image is needed (zero shots given)")
        if len(supports) > limits.max_shots:
            raise UserError(f"{len(supports)} shots given; at most {limits.max_shots} are accepted")
        if len(masks) != len(supports):
            raise UserError(f"{len(supports)} support images but {len(masks)} masks; give one mask per support")
        if b.shots and len(supports) != b.shots:
            raise UserError(f"{len(supports)} shots given; this model (BAM trained with {b.shots} shots) takes "
                            f"exactly {b.shots}")
        blobs = [(f"support {i + 1} ({f.filename})", await f.read(), f"mask {i + 1} ({mf.filename})", await mf.read())
                 for i, (f, mf) in enumerate(zip(supports, masks))]
        return await off_loop(prepare_supports, blobs, b.size, budget, threshold)

    def prepare_supports(blobs, size: int, budget: PixelBudget, threshold: float | None):
        """(support [1,K,3,S,S], masks [1,K,S,S], the masks' metadata)."""
        images, masks, meta = [], [], []
        for what, data, mwhat, mdata in blobs:
            img = read_image(data, what, limits.max_pixels, budget)
            m = read_mask(mdata, mwhat, img.shape[:2], limits.max_pixels, threshold)
            images.append(img)
            masks.append(m)
            meta.append({"file": what, "height": int(m.shape[0]), "width": int(m.shape[1]),
                         "object_pixels": int((m == 1).sum()), "ignore_pixels": int((m == 255).sum())})
        return (*support_tensors(images, masks, size), meta)

    async def run_query(query: UploadFile, feats, fmt: str, budget: PixelBudget):
        b = backend_or_503()
        x, valid, kept = await off_loop(prepare_query, await query.read(), f"query ({query.filename})", b.size,
                                        limits.max_pixels, budget, fmt)
        try:
            logits = await state["batcher"].decode(x, feats)
        except asyncio.TimeoutError:
            raise UserError(f"inference took longer than {limits.timeout_s} s", 504)
        return await off_loop(answer, logits, valid, kept, fmt, b.name)

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        if not state["ready"]:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "backend": state["backend"].name, "input_size": state["backend"].size}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def one_query(request: Request) -> None:
        """A form with two `query` parts would silently segment the last: refuse it (the form is parsed already)."""
        n = len((await request.form()).getlist("query"))
        if n > 1:
            raise UserError(f"the form has {n} query parts; send one query per request (or a batch through /v2)")

    def owned(request: Request, name: str) -> tuple[str, str]:
        """Support sets belong to the API key that registered them: another key never sees them."""
        return request.scope.get("svf.owner", ""), name

    threshold_doc = ("binarise masks that are not 0/1 or 0/255 (JPEG, anti-aliased): object where the value is at "
                     "least this fraction of white, 0 < t < 1; without it such masks are refused")
    format_doc = "png: the mask; overlay: the query with the mask drawn; json: COCO RLE"

    @app.post("/v1/segment", summary="Segment a query given k support images and their masks",
              responses=SEGMENT_RESPONSES, response_model=None)
    async def segment(request: Request, query: UploadFile = File(..., description="the image to segment"),
                      supports: list[UploadFile] = File(default=[], description="k support images"),
                      masks: list[UploadFile] = File(default=[], description="their masks, in the same order"),
                      format: Format = Form("png", description=format_doc),
                      mask_threshold: Optional[float] = Form(None, gt=0, lt=1, description=threshold_doc)):
        await one_query(request)
        budget = PixelBudget(limits.max_request_pixels)
        s, m, _ = await read_supports(supports, masks, budget, mask_threshold)
        feats = await asyncio.get_running_loop().run_in_executor(None, state["backend"].encode, s, m)
        return await run_query(query, feats, format, budget)

    @app.put("/v1/support-sets/{name}", status_code=201, summary="Register a named support set (encoded once)")
    async def register(request: Request, name: str, supports: list[UploadFile] = File(default=[]),
                       masks: list[UploadFile] = File(default=[]),
                       mask_threshold: Optional[float] = Form(None, gt=0, lt=1, description=threshold_doc)):
        check_name(name)
        s, m, meta = await read_supports(supports, masks, PixelBudget(limits.max_request_pixels), mask_threshold)
        feats = await asyncio.get_running_loop().run_in_executor(None, state["backend"].encode, s, m)
        try:
            await off_loop(state["store"].put, *owned(request, name), feats, {"shots": int(s.shape[1]), "masks": meta})
        except QuotaError as e:
            raise UserError(str(e), e.status) from e
        return {"name": name, "shots": int(s.shape[1])}

    @app.get("/v1/support-sets")
    async def list_sets(request: Request):
        backend_or_503()
        return {"support_sets": state["store"].names(request.scope.get("svf.owner", ""))}

    @app.delete("/v1/support-sets/{name}")
    async def delete_set(request: Request, name: str):
        backend_or_503()
        if not await off_loop(state["store"].delete, *owned(request, name)):
            raise UserError(f"no support set named {name[:64]!r}", 404)
        return {"deleted": name}

    @app.post("/v1/support-sets/{name}/segment", summary="Segment a query against a registered support set",
              responses=SEGMENT_RESPONSES, response_model=None)
    async def segment_named(request: Request, name: str, query: UploadFile = File(..., description="the image to segment"),
                            format: Format = Form("png", description=format_doc)):
        backend_or_503()
        await one_query(request)
        feats = state["store"].get(*owned(request, name))
        if feats is None:
            raise UserError(f"no support set named {name[:64]!r}", 404)
        return await run_query(query, feats, format, PixelBudget(limits.max_request_pixels))

    ui_page = (Path(__file__).parent / "ui.html").read_text()

    @app.get("/ui", include_in_schema=False)
    async def ui():
        """The page (serving/ui.html): everything inline, requests only to this service (its CSP says so)."""
        b = state["backend"] if state["ready"] else None
        limits_js = json.dumps({"max_pixels": limits.max_pixels, "max_shots": b.shots or limits.max_shots if b else
                                limits.max_shots, "max_upload_bytes": limits.max_upload_bytes,
                                "input_size": b.size if b else None, "palette": [color(i) for i in range(33)]})
        return HTMLResponse(ui_page.replace("__LIMITS__", limits_js.replace("</", "<\\/")), headers={
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "img-src 'self' blob: data:; connect-src 'self'; form-action 'none'; "
                                       "base-uri 'none'; frame-ancestors 'none'", "Cache-Control": "no-store"})

    @app.post("/v1/label-map", summary="Segment a query against several classes: one label map",
              responses=LABEL_MAP_RESPONSES, response_model=None)
    async def segment_classes(request: Request, query: UploadFile = File(..., description="the image to segment"),
                              sets: list[str] = Form(default=[], description="registered support sets, one class each "
                                                     "(class i = the i-th set, named after it)"),
                              supports: list[UploadFile] = File(default=[], description="inline classes: their support "
                                                                "images"),
                              masks: list[UploadFile] = File(default=[], description="their masks, in the same order"),
                              classes: list[str] = Form(default=[], description="the class of each inline support, same "
                                                        "order; a class's supports are its shots"),
                              background_threshold: float = Form(0.5, gt=0, lt=1, description="a pixel is background "
                                                                 "unless some class's foreground probability is above "
                                                                 "this; 0.5 is the single-class rule"),
                              format: Format = Form("png", description="png: the label map (palette PNG, value = class "
                                                    "id, 0 background); overlay: the query with each class in its "
                                                    "colour; json: one COCO RLE per class"),
                              mask_threshold: Optional[float] = Form(None, gt=0, lt=1, description=threshold_doc)):
        b = backend_or_503()
        await one_query(request)
        check_background_threshold(background_threshold)
        if len(classes) != len(supports):
            raise UserError(f"{len(supports)} inline support image(s) but {len(classes)} class name(s): give one "
                            "`classes` field per support, in the same order")
        if len(masks) != len(supports):
            raise UserError(f"{len(supports)} inline support image(s) but {len(masks)} mask(s); give one mask per "
                            "support")
        inline = list(dict.fromkeys(classes))
        names = check_classes(list(sets) + inline)
        feats = []
        for name in sets:
            check_name(name)
            f = state["store"].get(*owned(request, name))
            if f is None:
                raise UserError(f"no support set named {name[:64]!r}: register it first (PUT /v1/support-sets/{name})",
                                404)
            feats.append(f)
        budget = PixelBudget(limits.max_request_pixels)
        for name in inline:
            pick = [i for i, c in enumerate(classes) if c == name]
            s, m, _ = await read_supports([supports[i] for i in pick], [masks[i] for i in pick], budget,
                                          mask_threshold, what=f"class {name!r}: ")
            feats.append(await asyncio.get_running_loop().run_in_executor(None, b.encode, s, m))
        x, valid, kept = await off_loop(prepare_query, await query.read(), f"query ({query.filename})", b.size,
                                        limits.max_pixels, budget, format)
        try:     # one decode per class, queued together: classes with the same shot count share a backend call
            logits = await asyncio.gather(*(state["batcher"].decode(x, f) for f in feats))
        except asyncio.TimeoutError:
            raise UserError(f"inference took longer than {limits.timeout_s} s", 504)
        return await off_loop(answer_labels, [l[0] for l in logits], valid, kept, format, names, background_threshold,
                              b.name)

    add_open_inference_routes(app, state, off_loop, limits.timeout_s, limits.max_shots, limits.max_json_bytes)

    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "PUT",
                           "DELETE"], allow_headers=["authorization", "x-api-key", "content-type",
                                                               "inference-header-content-length"])
    app.add_middleware(Measured, observe=observe)
    # outermost: acts before the body is read (pure ASGI, serving/guard.py)
    app.add_middleware(Guard, keys=list(keys), allowed_hosts=list(allowed_hosts), max_body=limits.max_upload_bytes,
                       max_inflight=limits.max_inflight, body_timeout=limits.body_timeout_s,
                       on_refusal=lambda scope, status: requests.labels(route_template(scope), str(status)).inc())
    return app
