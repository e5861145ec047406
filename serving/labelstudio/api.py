"""The ML backend's HTTP API, as Label Studio calls it: /health, /setup, /predict, /webhook.

Each body is checked against the form Label Studio sends (``Setup``, ``Predict``, ``Webhook``: integer
project and annotation ids, string labels, brush regions with their RLE); anything else is a 400 naming the
field, never a 500. JSON is parsed, configs read, regions decoded and images fetched off the event loop
(fetches in a pool of their own, so a slow image server cannot hold up the model), and /health answers
while they run. Who may call: ``serving/guard.py`` in front (Host allow-list, body limit, body deadline),
optional basic auth as Label Studio's connection form sends it, and ``application/json`` bodies only (a
web page cannot send one to another origin without a CORS preflight, which this backend never grants).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import re
import xml.etree.ElementTree as ET
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field, StrictInt, StrictStr, ValidationError

from ..inputs import UserError, query_tensor, support_tensors
from ..labelmap import MAX_CLASSES, label_map
from .brush import brush_mask, brush_results
from .examples import Examples
from .images import ImageSource
from .sync import Sync

log = logging.getLogger("serving.labelstudio")
MAX_LABEL = 256                                  # characters of a label's name
Id = Annotated[StrictInt, Field(ge=0, le=2**53)]
Label = Annotated[StrictStr, Field(min_length=1, max_length=MAX_LABEL)]
PROJECT = re.compile(r"(\d{1,15})(\.\d{1,20})?")   # /setup and /predict: "<id>.<created at>" or the id


# ------------------------------------------------------------------ what Label Studio sends
class Task(BaseModel):
    id: Id | None = None
    data: dict[str, Any] = {}


class Setup(BaseModel):
    project: StrictStr | StrictInt
    schema_: StrictStr = Field("", alias="schema")
    hostname: StrictStr | None = None
    access_token: StrictStr | None = None


class Predict(BaseModel):
    project: StrictStr | StrictInt = ""
    label_config: StrictStr
    tasks: list[Task] = Field(default=[], max_length=1000)


class BrushValue(BaseModel):
    format: StrictStr
    rle: list[StrictInt]
    brushlabels: list[Label] = Field(min_length=1, max_length=MAX_CLASSES)


class BrushRegion(BaseModel):
    original_width: Annotated[StrictInt, Field(gt=0)]
    original_height: Annotated[StrictInt, Field(gt=0)]
    value: BrushValue


class WebhookProject(BaseModel):
    id: Id
    label_config: StrictStr = ""


class Annotation(BaseModel):
    id: Id
    result: list[dict[str, Any]] = []


class Training(BaseModel):
    project: WebhookProject


class AnnotationId(BaseModel):
    id: Id


class Deleted(BaseModel):
    project: WebhookProject
    annotations: list[AnnotationId] = Field(max_length=100_000)


class Webhook(BaseModel):
    action: StrictStr
    project: WebhookProject
    annotation: Annotation
    task: Task | None = None


M = TypeVar("M", bound=BaseModel)


def parsed(model: type[M], body: Any, what: str) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        fields = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()[:5])
        raise UserError(f"{what} is not what Label Studio sends ({fields})") from None


def project_id(p: str | int) -> int:
    m = PROJECT.fullmatch(str(p))
    if not m:
        raise UserError(f"project {str(p)[:40]!r} is not a Label Studio project id")
    return int(m.group(1))


# ------------------------------------------------------------------ the labelling config
class Config:
    """What the backend needs of a project's labelling config: the BrushLabels control, its image and labels."""

    def __init__(self, xml: str):
        try:
            root = ET.fromstring(xml or "")
        except ET.ParseError as e:
            raise UserError(f"the labelling config is not XML ({e})") from e
        brush = next((t for t in root.iter() if t.tag == "BrushLabels"), None)
        if brush is None:
            raise UserError("the labelling config has no <BrushLabels>: this backend paints brush regions")
        self.from_name, self.to_name = brush.get("name"), brush.get("toName")
        if not self.from_name or not self.to_name:
            raise UserError("the labelling config's <BrushLabels> needs a name and a toName")
        image = next((t for t in root.iter() if t.tag == "Image" and t.get("name") == self.to_name), None)
        if image is None or not (image.get("value") or "").startswith("$"):
            raise UserError(f"the labelling config has no <Image name={self.to_name!r} value=\"$...\">")
        self.data_key = image.get("value")[1:]
        self.labels = [t.get("value") or "" for t in brush if t.tag == "Label"]
        bad = [n for n in self.labels if not 0 < len(n) <= MAX_LABEL]
        if bad:
            raise UserError(f"the labelling config has a label of {len(bad[0])} characters; 1 to {MAX_LABEL} are taken")
        dup = sorted(n for n, c in Counter(self.labels).items() if c > 1)
        if dup:
            raise UserError(f"the labelling config names the label(s) {dup[:10]} twice")


# ------------------------------------------------------------------ the routes
class Metrics:
    """/metrics in Prometheus' text format: requests by route and status, their latency, tasks pre-annotated,
    examples stored, image reads refused."""
    ROUTES = ("/health", "/", "/setup", "/predict", "/webhook", "/metrics")

    def __init__(self, examples: Examples):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        self.requests = Counter("svf_ls_requests_total", "Requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("svf_ls_request_latency_seconds", "Request latency", ["route"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tasks = Counter("svf_ls_tasks_predicted_total", "Tasks pre-annotated (with regions or not)", registry=r)
        self.unreadable = Counter("svf_ls_images_unreadable_total", "Task images that could not be read", registry=r)
        Gauge("svf_ls_examples", "Annotated examples held", registry=r).set_function(examples.count)

    def observe(self, scope, status: int, seconds: float) -> None:
        route = scope["path"] if scope["path"] in self.ROUTES else "other"
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def answer(self):
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class Backend:
    """The state the routes share: the model, the examples, Label Studio and where images come from, the pools."""

    def __init__(self, model, examples: Examples, images: ImageSource, threshold: float,
                 auth: tuple[str, str] | None = None, port: int | None = None):
        self.model, self.examples, self.images, self.threshold = model, examples, images, threshold
        self.ls, self.auth_user = images.ls, auth[0] if auth else None
        basic = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode() if auth else None
        self.sync = Sync(self, basic, port)
        self.metrics = Metrics(examples)
        self.work = ThreadPoolExecutor(2, thread_name_prefix="ls-work")       # configs, regions, the model
        self.fetch = ThreadPoolExecutor(8, thread_name_prefix="ls-fetch")     # image reads (network-bound)

    async def run(self, fn, *args, pool=None):
        return await asyncio.get_running_loop().run_in_executor(pool or self.work, fn, *args)

    def segment(self, img: np.ndarray, feats: list) -> np.ndarray:
        x, valid = query_tensor(img, self.model.size)
        return label_map([self.model.decode(x, f)[0] for f in feats], valid, img.shape[:2], self.threshold)

    def regions(self, cfg: Config, aid: int, result) -> list[BrushRegion]:
        """An annotation's brush regions of the project's BrushLabels, checked; refused when one names a label the
        config does not have."""
        if not isinstance(result, list):
            raise UserError(f"annotation {aid}'s result is not a list")
        regions = [parsed(BrushRegion, x, f"annotation {aid}'s brush region") for x in result
                   if isinstance(x, dict) and x.get("type") == "brushlabels" and x.get("from_name") == cfg.from_name]
        unknown = sorted({n for x in regions for n in x.value.brushlabels} - set(cfg.labels))
        if unknown:
            raise UserError(f"annotation {aid} paints label(s) {unknown[:5]} that the project's config does not name")
        return regions

    def store(self, pid: int, aid: int, regions: list[BrushRegion], img: np.ndarray) -> list[str]:
        """Decode an annotation's regions against its image and store one example per label."""
        masks: dict[str, np.ndarray] = {}
        for r in regions:
            m = brush_mask(r.model_dump(), img.shape[:2])
            for name in r.value.brushlabels:
                masks[name] = masks[name] | m if name in masks else m
        for name, m in masks.items():
            if not m.any():
                raise UserError(f"annotation {aid}: the {name!r} region paints nothing")
        tensors = {name: support_tensors([img], [m], self.model.size) for name, m in masks.items()}
        self.examples.drop(pid, aid, deleted=False)       # an update replaces the annotation's examples
        for name, (s, mm) in tensors.items():
            self.examples.put(pid, name, aid, s[0, 0], mm[0, 0].astype(np.uint8))
        return sorted(masks)


async def json_body(request: Request, b: Backend) -> Any:
    """The body parsed off the event loop; not JSON, or nested past Python's limit, is a 400."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        raise UserError(f"the body must be application/json (got {ctype[:60] or 'no content type'})", 415)
    raw = await request.body()

    def load():
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise UserError(f"the request body is not JSON ({type(e).__name__})") from None
    return await b.run(load)


def basic_auth(user: str | None, password: str | None):
    """A dependency that requires HTTP basic auth with these credentials (none: open)."""
    want = f"{user}:{password}".encode() if user else None

    def check(request: Request):
        if want is None:
            return
        auth = request.headers.get("authorization", "")
        try:
            given = base64.b64decode(auth[6:], validate=True) if auth[:6].lower() == "basic " else b""
        except (binascii.Error, ValueError):
            given = b""
        if not hmac.compare_digest(given, want):
            raise UserError("basic auth required: the user and password given to this backend (Label Studio: "
                            "the model's connection settings, Basic Authentication)", 401)
    return check


def earlier_predictions(b: Backend, tasks: list[Task]) -> dict[int, set[int]]:
    """{task id: ids of its predictions from this backend} before this round (none known without Label Studio's
    token: nothing is then replaced)."""
    if not (b.ls.url and b.ls.token):
        return {}
    try:
        return {t.id: {p["id"] for p in b.sync.predictions(t.id)} for t in tasks if t.id is not None}
    except Exception as e:             # Label Studio unreachable: predictions stack up, the prediction goes on
        log.warning("cannot list earlier predictions (%s: %s)", type(e).__name__, e)
        return {}


def router(b: Backend, auth) -> APIRouter:
    r = APIRouter(dependencies=[Depends(auth)])

    @r.post("/setup")
    async def setup(request: Request):
        body = parsed(Setup, await json_body(request, b), "/setup's body")
        pid = project_id(body.project)
        cfg = await b.run(Config, body.schema_)    # a config this backend cannot serve is refused with its reason
        await b.run(b.ls.setup, body.hostname, body.access_token)      # only after every check
        b.sync.project(pid, cfg)                          # earlier annotations, the webhook: in the background
        return {"model_version": b.examples.version(b.examples.ready(pid, cfg.labels)[0])}

    @r.post("/webhook", status_code=201)
    async def webhook(request: Request):
        raw = await json_body(request, b)
        if not isinstance(raw, dict):
            raise UserError("the event is not a JSON object")
        action = raw.get("action")
        if action == "START_TRAINING":          # Label Studio's "Start training": read the project's annotations
            body = parsed(Training, raw, "the START_TRAINING event")
            b.sync.project(body.project.id, await b.run(Config, body.project.label_config), delays=(0,))
            return {"status": "ok", "job": "reading the project's annotations"}
        if action == "ANNOTATIONS_DELETED":     # what Label Studio sends when annotations are deleted
            body = parsed(Deleted, raw, "the ANNOTATIONS_DELETED event")
            removed = await b.run(b.examples.drop_many, body.project.id, [a.id for a in body.annotations])
            return {"status": "ok", "removed": removed}
        if action not in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED"):
            return {"status": "ignored", "reason": f"event {str(action)[:60]} does not change a support set"}
        body = parsed(Webhook, raw, f"the {action} event")
        pid, aid = body.project.id, body.annotation.id
        if action == "ANNOTATION_DELETED":
            return {"status": "ok", "removed": await b.run(b.examples.drop, pid, aid)}
        cfg = await b.run(Config, body.project.label_config)
        regions = await b.run(b.regions, cfg, aid, body.annotation.result)
        if not regions:
            return {"status": "ignored", "reason": f"annotation {aid} has no brush region of {cfg.from_name!r}: "
                                                   "nothing stored"}
        task = body.task or Task()
        img = await b.run(b.images.read, task.data.get(cfg.data_key), f"annotation {aid}'s image", task.id,
                          pool=b.fetch)
        labels = await b.run(b.store, pid, aid, regions, img)
        log.info("project %s: annotation %s -> examples of %s", pid, aid, ", ".join(labels))
        return {"status": "ok", "labels": labels}

    @r.post("/predict")
    async def predict(request: Request):
        body = parsed(Predict, await json_body(request, b), "/predict's body")
        pid = project_id(body.project)
        cfg = await b.run(Config, body.label_config)
        have, why = b.examples.ready(pid, cfg.labels)
        if why:
            log.info("project %s: no support set for %s", pid, "; ".join(f"{k}: {v}" for k, v in list(why.items())[:20]))
        if len(have) > MAX_CLASSES:
            raise UserError(f"{len(have)} labels have support sets; one prediction takes at most {MAX_CLASSES}")
        used, feats = await b.run(b.examples.snapshot, pid, list(have))   # a deletion meanwhile changes nothing
        names, version = list(used), b.examples.version(used)
        before = await b.run(earlier_predictions, b, body.tasks, pool=b.fetch)
        results = []
        for task in body.tasks:
            if not names:
                results.append({"result": [], "model_version": version})
                continue
            try:
                img = await b.run(b.images.read, task.data.get(cfg.data_key), f"task {task.id}", task.id, pool=b.fetch)
            except UserError as e:       # that task gets no regions; the others go on
                b.metrics.unreadable.inc()
                results.append({"result": [], "model_version": version, "error": str(e)})
                continue
            labels = await b.run(b.segment, img, feats)
            b.metrics.tasks.inc()
            regions = brush_results(labels, names, cfg.from_name, cfg.to_name)
            for reg in regions:          # which annotations made it, in the region's note
                ids = used[reg["value"]["brushlabels"][0]]
                reg["meta"] = {"text": [f"svf-fss: from annotation{'s' if len(ids) > 1 else ''} "
                                        f"{', '.join(map(str, ids))}"]}
            results.append({"result": regions, "model_version": version})
        b.sync.replace(before, version)
        return {"results": results, "model_version": version}

    return r
