"""Label Studio: pre-annotations from the few-shot model, and an ML backend whose support sets are your annotations.

    python -m serving.labelstudio --model-dir models/fold0/1shot --port 9090 --store labelstudio-sets/

Connect it in a project with a BrushLabels config (Settings > Model > http://127.0.0.1:9090). Every annotation
submitted (or updated) becomes an example of each label it paints: the ``--shots`` most recent examples of a
label are its support set (stored under --store, reloaded at start; a BAM model takes exactly its trained shot
count). ``/predict`` pre-annotates a task with every label that has a support set: one label map over them
(serving/labelmap.py), one brush region per label. Label Studio's API as it calls it: /health, /setup,
/predict, /webhook (ANNOTATION_CREATED, ANNOTATION_UPDATED, ANNOTATION_DELETED; other events are answered
and ignored). Images are read from their task URL: absolute http(s) URLs as they are, Label Studio's own
paths (/data/upload/..., /data/local-files/...) from the Label Studio host /setup names (or --ls-url) with
its token (or --ls-token, LABEL_STUDIO_API_KEY).

Brush regions travel in Label Studio's own RLE (``rle_encode``/``rle_decode``): the @thi.ng/rle-pack bit
stream of the image's RGBA bytes, tested against label-studio-sdk's converter. ``serving.predict --format
labelstudio`` writes the same regions into a task file Label Studio imports as pre-annotations.
"""

import argparse
import asyncio
import hashlib
import json
import logging
import os
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from .inputs import UserError

log = logging.getLogger("serving.labelstudio")
RLE_SIZES = (3, 4, 8, 16)          # rle-pack's run-length field widths, as Label Studio's editor writes them
MAX_IMAGE_BYTES = 50 << 20
MAX_PIXELS = 8192 * 8192


# ------------------------------------------------------------------ the brush RLE
def rle_encode(values: np.ndarray) -> list[int]:
    """The rle-pack stream (8-bit words) of a flat uint8 array: a 53-bit header (count, word size, the four
    run-length widths), then per run a repeat chunk (flag 1, width selector, length - 1, the value); a run of
    one is a one-word literal chunk. MSB first, zero-padded to whole bytes."""
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
            while n > 0:
                take = min(n, 1 << RLE_SIZES[-1])
                sel = next(i for i, s in enumerate(RLE_SIZES) if take <= 1 << s)
                parts.append("1" + format(sel, "02b") + format(take - 1, f"0{RLE_SIZES[sel]}b") + word)
                n -= take
    bits = "".join(parts)
    bits += "0" * (-len(bits) % 8)
    return list(int(bits, 2).to_bytes(len(bits) // 8, "big"))


def rle_decode(rle) -> np.ndarray:
    """The flat uint8 array of an rle-pack stream (any run-length widths, repeat and literal chunks)."""
    data = np.asarray(rle, np.uint8)
    bits = np.unpackbits(data)
    pos = 0

    def read(n):
        nonlocal pos
        if pos + n > len(bits):
            raise UserError("the brush RLE ends in the middle of a chunk")
        x = 0
        for b in bits[pos:pos + n].tolist():
            x = (x << 1) | b
        pos += n
        return x
    num, word = read(32), read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    if word != 8:
        raise UserError(f"the brush RLE has {word}-bit words; Label Studio writes 8")
    out = np.empty(num, np.uint8)
    i = 0
    while i < num:
        flag, sel = read(1), read(2)
        n = read(sizes[sel]) + 1
        if i + n > num:
            raise UserError(f"the brush RLE holds more than its {num} values")
        if flag:
            out[i:i + n] = read(8)
        else:
            for j in range(n):
                out[i + j] = read(8)
        i += n
    return out


def brush_mask(result: dict) -> np.ndarray:
    """The 0/1 mask [H, W] of one brushlabels result item (painted where the RGBA's alpha is non-zero)."""
    value = result.get("value") or {}
    h, w = int(result.get("original_height") or 0), int(result.get("original_width") or 0)
    if value.get("format") != "rle" or not isinstance(value.get("rle"), list):
        raise UserError("a brush region without RLE (value.format 'rle', value.rle)")
    flat = rle_decode(value["rle"])
    if h <= 0 or w <= 0 or flat.size != h * w * 4:
        raise UserError(f"a brush region of {flat.size} values does not fit its {w}x{h} RGBA image")
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
        image = next((t for t in root.iter() if t.tag == "Image" and t.get("name") == self.to_name), None)
        if image is None or not (image.get("value") or "").startswith("$"):
            raise UserError(f"the labelling config has no <Image name={self.to_name!r} value=\"$...\">")
        self.data_key = image.get("value")[1:]
        self.labels = [t.get("value") for t in brush if t.tag == "Label"]
        dup = sorted({n for n in self.labels if self.labels.count(n) > 1})
        if dup:
            raise UserError(f"the labelling config names the label(s) {dup} twice")


# ------------------------------------------------------------------ the examples (support sets)
class Examples:
    """Per project and label, the annotated examples (the support image and mask at the model's size), one file
    each under ``root``/<project>/<label>/<annotation id>.npz, written to a temporary file and renamed; the
    ``shots`` most recent are the label's support set, encoded when first needed."""

    def __init__(self, root: Path | None, backend, shots: int):
        self.root, self.backend, self.shots = root, backend, shots
        self.items: dict[tuple[str, str], dict[str, tuple[float, np.ndarray, np.ndarray]]] = {}
        self.feats: dict[tuple[str, str], tuple] = {}
        self.lock = threading.Lock()
        if root:
            for f in sorted(Path(root).glob("*/*/*.npz")):
                if f.name.startswith("."):
                    log.warning("%s is a temporary file a write left behind; not loaded: delete it", f)
                    continue
                try:
                    with np.load(f, allow_pickle=False) as z:
                        item = (float(z["time"]), z["support"], z["mask"])
                except Exception as e:     # a damaged file: named, left alone
                    log.warning("%s is not a readable example (%s); not loaded", f, e)
                    continue
                key = (f.parent.parent.name, urllib.parse.unquote(f.parent.name))
                self.items.setdefault(key, {})[f.stem] = item

    def _file(self, key, ann: str) -> Path:
        return Path(self.root) / key[0] / urllib.parse.quote(key[1], safe="") / f"{ann}.npz"

    def put(self, project: str, label: str, ann: str, support: np.ndarray, mask: np.ndarray) -> None:
        key, item = (project, label), (time.time(), support, mask)
        with self.lock:
            if self.root:
                f = self._file(key, ann)
                f.parent.mkdir(parents=True, exist_ok=True)
                tmp = f.with_name(f".{ann}.{os.getpid()}.tmp.npz")
                np.savez(tmp, time=np.float64(item[0]), support=support, mask=mask)
                os.replace(tmp, f)
            self.items.setdefault(key, {})[ann] = item
            self.feats.pop(key, None)

    def drop(self, project: str, ann: str) -> int:
        with self.lock:
            n = 0
            for key, anns in self.items.items():
                if key[0] == project and anns.pop(ann, None) is not None:
                    n += 1
                    self.feats.pop(key, None)
                    if self.root:
                        self._file(key, ann).unlink(missing_ok=True)
            return n

    def ready(self, project: str, labels: list[str]) -> tuple[list[str], dict[str, str]]:
        """(labels with a support set, {label: why not} for the others)."""
        have, why = [], {}
        for name in labels:
            n = len(self.items.get((project, name), {}))
            if n == 0:
                why[name] = "no annotated example yet"
            elif self.backend.shots and n < self.backend.shots:
                why[name] = f"{n} example(s); this model (BAM) takes {self.backend.shots}"
            else:
                have.append(name)
        return have, why

    def features(self, project: str, label: str):
        key = (project, label)
        with self.lock:
            if key not in self.feats:
                recent = sorted(self.items[key].values(), key=lambda t: t[0])[-(self.backend.shots or self.shots):]
                s = np.stack([t[1] for t in recent])[None]
                m = np.stack([t[2] for t in recent])[None].astype(np.float32)
                self.feats[key] = self.backend.encode(s, m)
            return self.feats[key]

    def version(self, project: str) -> str:
        """Changes whenever a set of this project changes, so that Label Studio asks again for its tasks."""
        h = hashlib.sha1()
        for (p, label), anns in sorted(self.items.items()):
            if p == project:
                h.update(json.dumps([label, sorted(anns)]).encode())
        return f"svf-fss-{h.hexdigest()[:10]}"


# ------------------------------------------------------------------ the ML backend
def create_app(model_dir: str | Path, backend: str = "auto", store: str | Path | None = None, shots: int = 5,
               ls_url: str | None = None, ls_token: str | None = None, threshold: float = 0.5):
    import httpx
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from fastapi_offline import FastAPIOffline

    from .backends import load_backend
    from .inputs import query_tensor, read_image, support_tensors
    from .labelmap import label_map

    b = load_backend(model_dir, backend)
    examples = Examples(Path(store) if store else None, b, shots)
    hosts: dict[str, tuple[str | None, str | None]] = {}     # project -> (Label Studio URL, token) from /setup
    app = FastAPIOffline(title="svf-fss Label Studio ML backend")
    http = httpx.Client(timeout=30, follow_redirects=True)

    def project_id(p) -> str:
        p = p.get("id") if isinstance(p, dict) else p
        return str(p).split(".", 1)[0]

    def fetch(url: str, project: str) -> np.ndarray:
        if not isinstance(url, str) or not url:
            raise UserError("the task has no image URL")
        if url.startswith("/"):
            base, token = hosts.get(project, (None, None))
            base, token = ls_url or base or os.environ.get("LABEL_STUDIO_URL"), \
                ls_token or token or os.environ.get("LABEL_STUDIO_API_KEY")
            if not base:
                raise UserError(f"cannot read {url}: a Label Studio path, and no Label Studio URL is known "
                                "(--ls-url, or connect the backend so that /setup names it)")
            full, headers = base.rstrip("/") + url, {"Authorization": f"Token {token}"} if token else {}
        elif url.startswith(("http://", "https://")):
            full, headers = url, {}
        else:
            raise UserError(f"cannot read image {url[:200]!r}: give an http(s) URL or a Label Studio path")
        try:
            with http.stream("GET", full, headers=headers) as r:
                if r.status_code != 200:
                    raise UserError(f"cannot read image {url[:200]}: HTTP {r.status_code}")
                data = b""
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) > MAX_IMAGE_BYTES:
                        raise UserError(f"image {url[:200]} is over {MAX_IMAGE_BYTES >> 20} MB")
        except httpx.HTTPError as e:
            raise UserError(f"cannot read image {url[:200]}: {e}") from e
        return read_image(data, f"image {url[:200]}", MAX_PIXELS)

    async def body_of(request) -> dict:
        try:
            body = await request.json()
        except ValueError as e:
            raise UserError(f"the request body is not JSON ({e})") from e
        if not isinstance(body, dict):
            raise UserError("the request body is not a JSON object")
        return body

    @app.exception_handler(UserError)
    async def _user_error(_request, exc: UserError):
        log.warning("%s", exc)
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.get("/health")
    @app.get("/")
    def health():
        return {"status": "UP", "model_class": "svf-fss", "backend": b.name}

    @app.post("/setup")
    async def setup(request: Request):
        body = await body_of(request)
        project = project_id(body.get("project", ""))
        hosts[project] = (body.get("hostname"), body.get("access_token"))
        Config(body.get("schema", ""))     # refuse a config this backend cannot serve, with its reason
        return {"model_version": examples.version(project)}

    @app.post("/webhook")
    async def webhook(request: Request):
        body = await body_of(request)
        action = body.get("action")
        if action not in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED"):
            return {"status": "ignored", "reason": f"event {action} does not change a support set"}
        ann, task, project = body.get("annotation") or {}, body.get("task") or {}, body.get("project") or {}
        pid, aid = project_id(project), str(ann.get("id"))
        if action == "ANNOTATION_DELETED":
            return {"status": "ok", "removed": examples.drop(pid, aid)}
        cfg = Config(project.get("label_config", ""))
        regions = [r for r in ann.get("result") or [] if r.get("type") == "brushlabels" and
                   r.get("from_name") == cfg.from_name]
        if not regions:
            return JSONResponse({"status": "ignored", "reason": f"annotation {aid} has no brush region of "
                                 f"{cfg.from_name!r}: nothing stored"}, status_code=200)
        masks: dict[str, np.ndarray] = {}
        for r in regions:
            m = brush_mask(r)
            for name in (r.get("value") or {}).get("brushlabels") or []:
                masks[name] = masks[name] | m if name in masks else m
        img = await _off(fetch, (task.get("data") or {}).get(cfg.data_key), pid)
        for name, m in masks.items():
            if m.shape != img.shape[:2]:
                raise UserError(f"annotation {aid}: the {name!r} region is {m.shape[1]}x{m.shape[0]} but the image is "
                                f"{img.shape[1]}x{img.shape[0]}")
            if not m.any():
                raise UserError(f"annotation {aid}: the {name!r} region paints nothing")
        if action == "ANNOTATION_UPDATED":
            examples.drop(pid, aid)
        for name, m in masks.items():
            s, mm = support_tensors([img], [m], b.size)
            examples.put(pid, name, aid, s[0, 0], mm[0, 0].astype(np.uint8))
        log.info("project %s: annotation %s -> examples of %s", pid, aid, ", ".join(masks))
        return {"status": "ok", "labels": sorted(masks)}

    @app.post("/predict")
    async def predict(request: Request):
        body = await body_of(request)
        pid = project_id(body.get("project", ""))
        cfg = Config(body.get("label_config", ""))
        names, why = examples.ready(pid, cfg.labels)
        version = examples.version(pid)
        if why:
            log.info("project %s: no support set for %s", pid, "; ".join(f"{k}: {v}" for k, v in why.items()))
        results = []
        for task in body.get("tasks") or []:
            if not names:
                results.append({"result": [], "model_version": version})
                continue
            try:
                img = await _off(fetch, (task.get("data") or {}).get(cfg.data_key), pid)
            except UserError as e:       # that task gets no regions; the others go on
                log.warning("task %s: %s", task.get("id"), e)
                results.append({"result": [], "model_version": version, "error": str(e)})
                continue
            labels = await _off(segment, img, names, pid)
            results.append({"result": brush_results(labels, names, cfg.from_name, cfg.to_name),
                            "model_version": version})
        return {"results": results, "model_version": version}

    def segment(img, names, pid):
        x, valid = query_tensor(img, b.size)
        logits = [b.decode(x, examples.features(pid, n))[0] for n in names]
        return label_map(logits, valid, img.shape[:2], threshold)

    async def _off(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    app.state.examples = examples
    return app


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m serving.labelstudio", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="models/fold0/1shot")
    ap.add_argument("--backend", default="auto", help="auto, tensorrt, onnxruntime, aoti or torch")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9090)
    ap.add_argument("--store", default="labelstudio-sets", help="folder of the annotated examples ('' : memory only)")
    ap.add_argument("--shots", type=int, default=5, help="a label's support set: its most recent examples (default 5)")
    ap.add_argument("--background-threshold", type=float, default=0.5)
    ap.add_argument("--ls-url", default=None, help="Label Studio's URL, for images under its own paths (default: what "
                    "/setup says, or LABEL_STUDIO_URL)")
    ap.add_argument("--ls-token", default=None, help="its API token (default: /setup's, or LABEL_STUDIO_API_KEY)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .model_files import missing_model
    problem = missing_model(Path(args.model_dir), args.backend)
    if problem:
        raise SystemExit(f"error: {problem}")
    if not 1 <= args.shots <= 10:
        raise SystemExit("error: --shots must be 1 to 10")
    import uvicorn
    uvicorn.run(create_app(args.model_dir, args.backend, args.store or None, args.shots, args.ls_url, args.ls_token,
                           args.background_threshold), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
