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
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .backends import Backend, load_backend
from .batching import Batcher, Pending  # noqa: F401  (the batcher's home; imported from here by benchmarks)
from .guard import Guard
from .inputs import MAX_PIXELS, MAX_REQUEST_PIXELS, MAX_SHOTS, UserError
from .kserve import add_routes as add_open_inference_routes
from .routes import health, segment, sets
from .service import Service, answer, prepare_query  # noqa: F401
from .store import SupportStore, feature_shapes, fingerprint

log = logging.getLogger(__name__)


@dataclass
class Limits:
    max_upload_bytes: int = 20 * 1024 * 1024      # whole request body, counted while it streams
    max_pixels: int = MAX_PIXELS                 # per image
    max_request_pixels: int = MAX_REQUEST_PIXELS  # all images of one request together
    max_inflight: int = 64                       # /v1 requests at once; the next answers 503 + Retry-After
    body_timeout_s: float = 60.0                 # the whole body must arrive within this (408 otherwise)
    max_shots: int = MAX_SHOTS
    timeout_s: float = 30.0
    max_batch: int = 8
    batch_window_ms: float = 5.0
    max_json_bytes: int = 2 * 1024 * 1024        # /v2 JSON parsed or written (binary tensors beyond it; kserve.py)


# image worker threads: the CPUs, at most 4 (README, "Figures": on 2 cores 2 served more than 4)
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


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


def share_cpu(backend: Backend) -> None:
    """How the process divides the CPU between the model and the image work, set once at start-up."""
    if backend.kind in ("onnxruntime", "openvino", "tensorrt") or getattr(getattr(backend, "device", None), "type", "") == "cuda":
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
    svc = Service(limits or Limits(), workers)
    limits = svc.limits
    svc.registry = registry = CollectorRegistry()
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
    app.state.service = svc
    state = svc.state

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
        svc.pool.shutdown(wait=False)

    def route_template(scope) -> str:
        """The matched route's template (``/v1/support-sets/{name}``), so that metrics have one label per
        route however many paths clients invent; every unknown path is ``unmatched``."""
        route = scope.get("route")      # set by the router on its way in
        if getattr(route, "path", None):
            return route.path
        for route in flat_routes:        # refused before routing (serving/guard.py)
            if route.matches(scope)[0] == Match.FULL:
                return route.path
        return "unmatched"

    def observe(scope, status: int, seconds: float) -> None:
        endpoint = route_template(scope)
        requests.labels(endpoint, str(status)).inc()
        latency.labels(endpoint).observe(seconds)

    add_error_handlers(app)
    routers = (health.router, segment.router, sets.router)
    for r in routers:
        app.include_router(r)
    add_open_inference_routes(app, state, svc.off_loop, limits.timeout_s, limits.max_shots, limits.max_json_bytes)
    # the routes as declared (an included router appears in app.router.routes as one entry without a path)
    flat_routes = [r for r in app.router.routes if hasattr(r, "path")] + [r for rt in routers for r in rt.routes]
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


def add_error_handlers(app: FastAPI) -> None:
    """Every error, the service's own and the framework's, answers {"error": ...}."""
    @app.exception_handler(UserError)
    async def _user_error(_request, exc: UserError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        """Errors raised inside the framework (an unparsable multipart body, too many parts, an unknown
        path) keep the service's one error shape."""
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, exc: RequestValidationError):
        msgs = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', []))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": f"bad request: {msgs}"}, status_code=422)
