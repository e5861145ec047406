"""The Label Studio ML backend (python -m serving.labelstudio) on 127.0.0.1 under hostile and careless input:
its store, its token, its fetches, its memory and event loop, its answers to malformed events."""
import base64
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pipeline.data.synthetic import generate_image
from serving.labelstudio import brush_mask, rle_encode
from test_serving import ROOT, _free_port, _wait_http, model_dir  # noqa: F401  (model_dir: the module's fixture)

CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="A"/><Label value="B"/><Label value="."/><Label value=".."/></BrushLabels></View>')
AUTH = ("labeller", "a-long-backend-password")
TOKEN = "ls-token-for-the-real-label-studio"
LS_VENV = ROOT / ".venv-labelstudio"
LS_READY = LS_VENV / ".installed-2"         # the Makefile's stamp
LS_USER = ("tests@svf-fss.local", "svf-fss-tests")       # the Makefile's `label-studio init`


class Site:
    """A web server on 127.0.0.1 that records every request (path, Authorization) and serves generated PNGs
    at any path ending in <n>.png; /redirect?to=URL redirects, /slow.png trickles a byte every 0.3 s."""

    def __init__(self):
        self.seen: list[tuple[str, str | None]] = []
        self.storage = None                  # where /tasks/<id>/presign/ sends a cloud URI (a bucket's URL)
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def answer(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):       # Label Studio under its default SSRF protection, asked for a webhook
                site.seen.append((self.path, self.headers.get("Authorization")))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.answer(403, b'{"detail": "URL resolves to a reserved network address (block: 127.0.0.0/8)"}')

            def do_GET(self):
                site.seen.append((self.path, self.headers.get("Authorization")))
                api = {"/api/ml": [{"id": 1, "url": "http://127.0.0.1:9", "basic_auth_user": AUTH[0]}],
                       "/api/webhooks/": [], "/api/tasks": {"tasks": []}}.get(self.path.split("?", 1)[0])
                if api is not None and site.storage:       # the Label Studio stand-in's API
                    self.answer(200, json.dumps(api).encode())
                    return
                if self.path.startswith("/tasks/") and "/presign/?fileuri=" in self.path and site.storage:
                    uri = base64.urlsafe_b64decode(self.path.split("fileuri=", 1)[1]).decode()
                    self.send_response(303)         # as Label Studio answers for a storage with presigned URLs
                    self.send_header("Location", site.storage + "/" + uri.rsplit("/", 1)[1] + "?signature=x")
                    self.end_headers()
                    return
                if self.path.startswith("/redirect?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("=", 1)[1])
                    self.end_headers()
                    return
                if self.path.startswith("/slow"):
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    try:
                        for _ in range(100):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.3)
                    except OSError:
                        pass
                    return
                name = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
                if name == "big.png":
                    img = np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8)
                elif name.endswith(".png") and name[:-4].isdigit():
                    img, _ = generate_image(int(name[:-4]), "val", 60, 7)
                else:
                    self.send_error(404)
                    return
                buf = BytesIO()
                Image.fromarray(img).save(buf, "PNG")
                self.send_response(200)
                self.send_header("Content-Length", str(len(buf.getvalue())))
                self.end_headers()
                self.wfile.write(buf.getvalue())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


class Backend:
    def __init__(self, model_dir, store: Path, *flags):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = store.parent / f"backend-{self.port}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.labelstudio", "--model-dir", str(model_dir), "--backend", "onnxruntime",
             "--port", str(self.port), "--store", str(store), "--shots", "1", *flags],
            env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        try:
            _wait_http(self.url + "/health", self.proc, "the ML backend")
        except BaseException:                   # never leave a backend that did not come up running
            self.proc.kill()
            raise
        self.http = httpx.Client(base_url=self.url, auth=AUTH, timeout=60)

    def post(self, path, body, **kw):
        return self.http.post(path, json=body, **kw)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(15)


@pytest.fixture(scope="module")
def sites():
    ls, other, evil, bucket = Site(), Site(), Site(), Site()
    ls.storage = bucket.url
    yield ls, other, evil, bucket
    for s in (ls, other, evil, bucket):
        s.stop()


@pytest.fixture(scope="module")
def ls_backend(model_dir, sites, tmp_path_factory):  # noqa: F811
    """No --ls-url: the first /setup that passes pins Label Studio's host; one other image host allowed."""
    d = tmp_path_factory.mktemp("lsb")
    _, other, _, _ = sites
    b = Backend(model_dir, d / "store", "--basic-auth-user", AUTH[0], "--basic-auth-pass", AUTH[1],
                "--allow-image-host", other.url.split("//")[1], "--fetch-timeout", "2")
    b.root = d
    yield b
    b.stop()


def region(label: str, mask: np.ndarray, rle=None) -> dict:
    return {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": mask.shape[1],
            "original_height": mask.shape[0], "image_rotation": 0,
            "value": {"format": "rle", "brushlabels": [label],
                      "rle": rle if rle is not None else rle_encode(np.repeat(mask.ravel() * np.uint8(255), 4))}}


def event(project, ann, image: str, regions: list, action="ANNOTATION_CREATED") -> dict:
    return {"action": action, "project": {"id": project, "label_config": CONFIG},
            "annotation": {"id": ann, "result": regions}, "task": {"id": 1, "data": {"image": image}}}


def disc() -> np.ndarray:
    yy, xx = np.mgrid[:60, :60]
    return (((yy - 30) ** 2 + (xx - 30) ** 2) < 200).astype(np.uint8)


def tree(root: Path) -> set:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_the_token_goes_only_to_the_pinned_label_studio(ls_backend, sites):
    """Item 2: /setup pins Label Studio's host only once every check passed; another host is then refused (403)
    and never sees the token."""
    ls, _, evil, _ = sites
    b = ls_backend
    r = b.post("/setup", {"project": "1.1700000000", "schema": "<View/>", "hostname": evil.url, "access_token": "x"})
    assert r.status_code == 400 and "BrushLabels" in r.json()["error"]
    r = b.post("/setup", {"project": 1, "schema": CONFIG, "hostname": ls.url, "access_token": TOKEN})
    assert r.status_code == 200, r.text
    r = b.post("/setup", {"project": 2, "schema": CONFIG, "hostname": evil.url, "access_token": "stolen?"})
    assert r.status_code == 403 and "--ls-url" in r.json()["error"]
    r = b.post("/webhook", event(1, 11, "/data/upload/1/3.png", [region("A", disc())]))
    assert r.status_code == 201, r.text
    assert ("/data/upload/1/3.png", f"Token {TOKEN}") in ls.seen
    assert evil.seen == []


def test_no_name_from_a_request_becomes_a_path_outside_the_store(ls_backend):
    """Items 1 and 10: ids that are not Label Studio's integers are refused; labels are stored under a digest,
    so '.', '..' and 'a/../..' stay inside the store; an annotation without an id is refused."""
    b, store = ls_backend, ls_backend.root / "store"
    outside = tree(b.root) - {p for p in tree(b.root) if p.startswith("store")}
    bad = [event("/x/y", 21, "/data/upload/3.png", [region("A", disc())]),
           event("", 22, "/data/upload/3.png", [region("..", disc())]),
           event(1, "../../escape", "/data/upload/3.png", [region("A", disc())]),
           event(1, None, "/data/upload/3.png", [region("A", disc())]),
           event(1.5, 23, "/data/upload/3.png", [region("A", disc())]),
           event(1, 24, "/data/upload/3.png", [region("../../x", disc())]),
           event(1, 25, "/data/upload/3.png", [region("", disc())])]
    for body in bad:
        r = b.post("/webhook", body)
        assert r.status_code == 400, (body["project"], body["annotation"]["id"], r.text)
        assert r.headers["content-type"] == "application/json"
    for ann, label in ((26, "."), (27, "..")):
        r = b.post("/webhook", event(1, ann, "/data/upload/7.png", [region(label, disc())]))
        assert r.status_code == 201, r.text
    assert tree(b.root) - {p for p in tree(b.root) if p.startswith("store")} == outside
    assert not Path("/x/y").exists() and not (b.root / "escape").exists()
    files = sorted(p.relative_to(store).parts for p in store.rglob("*.npz"))
    assert all(len(parts) == 3 and parts[0] == "1" and len(parts[1]) == 32 for parts in files), files
    assert {p[2] for p in files} >= {"26.npz", "27.npz"}


def test_only_label_studio_and_allowed_hosts_are_fetched_and_errors_tell_nothing(ls_backend, sites):
    """Item 4: a URL on a host not allowed is never requested, a redirect off the allowed hosts is not followed,
    and every failure answers the same generic error (what answered stays in the log)."""
    ls, other, evil, _ = sites
    b = ls_backend
    dead = f"http://127.0.0.1:{_free_port()}/1.png"
    errors = set()
    for url in (evil.url + "/1.png", dead, other.url + "/redirect?to=" + evil.url + "/2.png", "file:///etc/passwd",
                other.url + "/nothing.txt", "http://[::1]:1/x.png", "/data/\x00x.png",
                # Label Studio's own origin: only /data/ and the presign endpoint, and only presign redirects elsewhere
                "/api/current-user/whoami", ls.url + "/redirect?to=" + evil.url + "/3.png"):
        r = b.post("/webhook", event(1, 31, url, [region("A", disc())]))
        assert r.status_code == 400, (url, r.text)
        errors.add(r.json()["error"])
    assert errors == {"the task's image could not be read (the backend's log says why)"}
    assert evil.seen == [] and not [p for p, _ in ls.seen if p.startswith(("/redirect", "/api/current-user"))]
    r = b.post("/webhook", event(1, 32, other.url + "/4.png", [region("B", disc())]))
    assert r.status_code == 201, r.text
    assert (("/4.png", None)) in other.seen         # an allowed host: read, without the token
    assert "not the configured Label Studio" in b.log.read_text()


def test_only_authenticated_json_from_allowed_hosts_is_served(ls_backend):
    """Item 3: basic auth, the Host allow-list and application/json bodies (a web page's text/plain POST or a
    rebound DNS name is refused)."""
    b = ls_backend
    body = {"project": 1, "schema": CONFIG}
    assert httpx.post(b.url + "/setup", json=body).status_code == 401
    assert httpx.post(b.url + "/setup", json=body, auth=(AUTH[0], "wrong")).status_code == 401
    r = b.http.post("/setup", content=json.dumps(body), headers={"content-type": "text/plain"})
    assert r.status_code == 415, r.text
    r = b.http.post("/setup", json=body, headers={"host": "attacker.example"})
    assert r.status_code == 400 and "Host" in r.json()["error"]
    assert b.post("/setup", body).status_code == 200
    assert httpx.get(b.url + "/metrics").status_code == 401          # Label Studio's ML API: /metrics, behind the auth
    metrics = b.http.get("/metrics").text
    assert 'svf_ls_requests_total{route="/setup",status="200"}' in metrics and "svf_ls_examples" in metrics


def _health_max(url: str, stop: threading.Event) -> list:
    times = []
    while not stop.is_set():
        t = time.perf_counter()
        httpx.get(url + "/health", timeout=30)
        times.append(time.perf_counter() - t)
        time.sleep(0.02)
    return times


def under_load(b, fn):
    """(what fn returned, the slowest /health answer while it ran, how long it ran)."""
    stop, times = threading.Event(), []
    t = threading.Thread(target=lambda: times.extend(_health_max(b.url, stop)))
    t.start()
    start = time.perf_counter()
    try:
        out = fn()
    finally:
        took = time.perf_counter() - start
        stop.set()
        t.join()
    return out, max(times), took


def stream(n: int, chunks: str) -> list[int]:
    """An rle-pack stream: n values, 8-bit words, run-length widths 3, 4, 8, 16, then ``chunks`` (bits)."""
    bits = format(n, "032b") + "00111" + "0010" + "0011" + "0111" + "1111" + chunks
    bits += "0" * (-len(bits) % 8)
    return list(int(bits, 2).to_bytes(len(bits) // 8, "big"))


def test_brush_rle_is_checked_before_it_is_allocated_and_decoded_off_the_loop(ls_backend):
    """Item 5: a stream that declares 2^30 values is refused before anything is allocated; a literal-only stream
    decodes off the event loop (/health keeps answering)."""
    b = ls_backend
    r = b.post("/webhook", event(1, 41, "/data/upload/3.png", [region("A", disc(), stream(2 ** 30, "") + [0] * 55000)]))
    assert r.status_code == 400 and "declares 1073741824 values" in b.log.read_text()
    # a literal-only stream for the 600x600 image: 1.44 million one-word chunks, alternating 0 and 255 (every
    # pixel's alpha painted)
    n = 600 * 600 * 4
    rle = stream(n, ("000000" + "0" * 8 + "000000" + "1" * 8) * (n // 2))
    full = np.ones((600, 600), np.uint8)
    r, slowest, took = under_load(b, lambda: b.post("/webhook", event(1, 42, "/data/upload/big.png",
                                                                      [region("A", full, rle)])))
    print(f"literal-only brush RLE of {n} values: {took:.1f} s; /health answered within {slowest * 1000:.0f} ms")
    # on the event loop, /health waited for the whole decode; off it, a switch of Python's lock (the machine may
    # be busy with other tests, so the bound is relative)
    assert r.status_code == 201 and slowest < took / 3, (r.text, slowest, took)


def test_bodies_nesting_labels_and_slow_images_are_bounded(ls_backend, sites):
    """Item 7: a body over the limit is 413 before it is read; JSON nested 100,000 deep is a 400; a config of
    20,000 labels is checked in linear time off the loop; an image that trickles is cut at --fetch-timeout while
    other webhooks are answered."""
    _, other, _, _ = sites
    b = ls_backend
    r = b.http.post("/predict", content=b"[" * 40_000_000, headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = b.http.post("/predict", content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    many = "".join(f'<Label value="L{i}"/>' for i in range(20_000))
    cfg = f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{many}</BrushLabels></View>'
    t = time.perf_counter()
    r, slowest, took = under_load(b, lambda: b.post("/predict", {"project": 1, "label_config": cfg, "tasks": []}))
    assert r.status_code == 200 and took < 5, (r.text, took)
    slow = threading.Thread(target=lambda: b.post("/webhook", event(1, 51, other.url + "/slow.png",
                                                                    [region("A", disc())])))
    slow.start()
    t = time.perf_counter()
    r = b.post("/webhook", event(1, 52, other.url + "/5.png", [region("B", disc())]))
    assert r.status_code == 201 and time.perf_counter() - t < 2, r.text
    slow.join()
    assert time.perf_counter() - t < 5 and "took more than 2 s" in b.log.read_text()


def test_deleting_while_predicting_never_fails_a_prediction(ls_backend, sites):
    """Item 8: annotations created and deleted while /predict runs: every prediction answers 200."""
    b, other = ls_backend, sites[1].url
    tasks = [{"id": i, "data": {"image": f"{other}/{i}.png"}} for i in range(3)]
    codes, stop = [], threading.Event()

    def churn():
        i = 0
        while not stop.is_set():
            for action in ("ANNOTATION_CREATED", "ANNOTATION_DELETED"):
                b.post("/webhook", event(3, 60 + i % 2, f"{other}/{i % 5}.png", [region("A", disc())], action))
            i += 1
    b.post("/webhook", event(3, 59, f"{other}/8.png", [region("B", disc())]))
    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(25):
            codes.append(b.post("/predict", {"project": "3.1700000000", "label_config": CONFIG, "tasks": tasks}).status_code)
    finally:
        stop.set()
        t.join()
    assert codes == [200] * 25


def test_malformed_events_answer_400_json(ls_backend, sites):
    """Item 9: valid JSON of the wrong form answers 400 with a JSON error, never 500; a numeric label is refused
    and the project keeps working."""
    b = ls_backend
    good = event(1, 71, sites[1].url + "/3.png", [region("A", disc())])
    bodies = [[], "x", 5, {"action": "ANNOTATION_CREATED"}, {**good, "project": []}, {**good, "project": {"id": 1}},
              {**good, "annotation": []}, {**good, "annotation": {"id": 1, "result": {}}},
              {**good, "annotation": {"id": 1, "result": [5]}}, {**good, "task": []}, {**good, "task": {"data": []}},
              {**good, "task": {"data": {"image": 5}}}, {**good, "project": {"id": 1, "label_config": 5}},
              event(1, 72, "/data/upload/3.png", [{**region("A", disc()), "value": []}]),
              event(1, 72, "/data/upload/3.png", [{**region("A", disc()), "value": {"format": "rle", "rle": "x",
                                                                                     "brushlabels": ["A"]}}]),
              event(1, 72, "/data/upload/3.png", [{**region("A", disc()), "original_width": "60"}]),
              event(1, 72, "/data/upload/3.png", [{**region("A", disc()), "original_width": -60}]),
              event(1, 72, "/data/upload/3.png", [region(7, disc())]),
              event(1, 72, "/data/upload/3.png", [region("A", disc(), [300] * 10)]),
              event(1, 72, "/data/upload/3.png", [region("A", disc(), [1, 2])]),
              event(1, 72, "/data/upload/3.png", [region("Z", disc())]),
              {"project": 1, "label_config": CONFIG, "tasks": 5}]
    for body in bodies:
        r = b.post("/predict" if isinstance(body, dict) and "tasks" in body else "/webhook", body)
        assert r.status_code == 400 and r.headers["content-type"] == "application/json", (body, r.text)
    for body in ({"project": 1, "label_config": CONFIG, "tasks": [5]}, {"project": "1;x", "label_config": CONFIG},
                 {"project": 1, "label_config": 5}):
        assert b.post("/predict", body).status_code == 400, body
    assert b.post("/webhook", good).status_code == 201
    r = b.post("/predict", {"project": 1, "label_config": CONFIG, "tasks": [{"id": 1, "data": {"image": good["task"]["data"]["image"]}}]})
    assert r.status_code == 200 and r.json()["results"][0]["result"], r.text


def test_bad_settings_are_refused_at_start(tmp_path, capsys):
    """Item 9: --background-threshold outside (0, 1) or NaN is refused before the backend starts; item 2: so is a
    token without the Label Studio it belongs to."""
    from serving.labelstudio.__main__ import main
    for flags, msg in [(["--background-threshold", t], "--background-threshold") for t in ("0", "1", "1.5", "nan")] \
            + [(["--ls-token", "t"], "--ls-url")]:
        with pytest.raises(SystemExit) as e:
            main(["--model-dir", str(tmp_path), *flags])
        assert e.value.code == 2 and msg in capsys.readouterr().err, flags


def test_cloud_uris_go_through_the_presign_endpoint_and_every_event_form_is_read(ls_backend, sites):
    """Issue 36: an s3:// (gs://, azure-blob://) task image is read through Label Studio's presign endpoint with its
    token, then from the storage it redirects to, without the token; ANNOTATIONS_DELETED (what Label Studio sends
    on deletion) removes the examples; START_TRAINING is answered (201) and reads the project from Label Studio."""
    ls, _, _, bucket = sites
    b = ls_backend
    assert b.post("/setup", {"project": 4, "schema": CONFIG, "hostname": ls.url, "access_token": TOKEN}).status_code == 200
    for n, uri in enumerate(("s3://photos/train/3.png", "gs://photos/5.png", "azure-blob://c/photos/6.png")):
        r = b.post("/webhook", event(4, 90 + n, uri, [region("A", disc())]))
        assert r.status_code == 201, r.text
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode()
        assert (f"/tasks/1/presign/?fileuri={fileuri}", f"Token {TOKEN}") in ls.seen
    assert [a for _, a in bucket.seen] == [None] * 3 and bucket.seen[0][0] == "/3.png?signature=x"
    r = b.post("/webhook", {"action": "ANNOTATIONS_DELETED", "project": {"id": 4, "label_config": CONFIG},
                            "annotations": [{"id": 90}, {"id": 91}, {"id": 999}]})
    assert r.status_code == 201 and r.json()["removed"] == 2, r.text
    files = {f.name for f in (b.root / "store" / "4").rglob("*.npz")}
    assert files == {"92.npz"}
    r = b.post("/webhook", {"action": "START_TRAINING", "project": {"id": 4, "label_config": CONFIG}})
    assert r.status_code == 201 and r.json()["status"] == "ok", r.text
    wait_for("the project read from Label Studio", lambda: any(p.startswith("/api/tasks?project=4") for p, _ in ls.seen))


def test_a_webhook_label_studio_refuses_is_named_in_health(ls_backend, sites):
    """Issue 36, item 1: where Label Studio refuses the webhook (its default SSRF protection), the backend says so
    in its log and in /health, with the setting to change, instead of a silent "Connected"."""
    ls = sites[0]
    b = ls_backend
    assert b.post("/setup", {"project": 5, "schema": CONFIG, "hostname": ls.url, "access_token": TOKEN}).status_code == 200
    problems = wait_for("the refusal in /health", lambda: [p for p in b.http.get("/health").json()["problems"]
                                                            if "project 5" in p])
    assert "SSRF_PROTECTION_ENABLED=false" in problems[0] and "reserved network address" in problems[0], problems
    assert "problems" not in httpx.get(b.url + "/health").json()       # told only to who has the basic auth
    assert ("/api/webhooks/", f"Token {TOKEN}") in ls.seen


def test_a_personal_access_token_is_exchanged_and_exchanged_again_after_a_401():
    """Issue 36: a personal access token (a JWT) goes to /api/token/refresh/ for an access token sent as Bearer;
    when Label Studio answers 401 (the 5-minute access token expired), it is exchanged again and the read
    retried; a legacy token is sent as `Token <key>`."""
    from serving.labelstudio.client import LabelStudio
    seen, issued = [], []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            issued.append(f"access-{len(issued)}")
            out = json.dumps({"access": issued[-1]} if body == {"refresh": pat} else {"detail": "Token is invalid"})
            self.send_response(200 if body == {"refresh": pat} else 401)
            self.end_headers()
            self.wfile.write(out.encode())

        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            ok = self.headers.get("Authorization") in ("Bearer access-1", "Token " + "ab" * 20)
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(b"image" if ok else b'{"detail": "Authentication credentials were not provided."}')
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    claims = base64.urlsafe_b64encode(json.dumps({"token_type": "refresh", "exp": 9e9}).encode()).decode().rstrip("=")
    pat = f"eyJhbGciOiJIUzI1NiJ9.{claims}.signature"
    # a token counts only with the host it came from: a /setup with a token and no host, then one naming another
    # host, must not send that token there
    loose = LabelStudio(None, None)
    loose.setup("", "first-token")
    loose.setup("http://127.0.0.1:9", None)
    assert loose.token is None and loose.headers() == {}
    try:
        ls = LabelStudio(url, pat)
        r = ls.stream(url + "/data/upload/1/a.png")
        assert r.read() == b"image" and seen == ["Bearer access-0", "Bearer access-1"] and issued == ["access-0", "access-1"]
        legacy = LabelStudio(url, "ab" * 20)
        assert legacy.request("GET", "/data/upload/1/a.png").content == b"image" and seen[-1] == "Token " + "ab" * 20
    finally:
        server.shutdown()


def test_a_restart_keeps_every_label_and_skips_bad_examples(ls_backend, model_dir, sites):  # noqa: F811
    """Items 9 and 10: after a restart the sets of '.', '..' and the others are back; an example of another size
    (a file put in the store) is named in the log and skipped, and predictions go on."""
    ls, other, _, _ = sites
    b = ls_backend
    for ann, label in ((26, "."), (27, "..")):
        assert b.post("/webhook", event(1, ann, sites[1].url + "/7.png", [region(label, disc())])).status_code == 201
    cfg = {"project": 1, "label_config": CONFIG, "tasks": [{"id": 9, "data": {"image": sites[1].url + "/9.png"}}]}
    before = b.post("/predict", cfg).json()
    labels = {r["value"]["brushlabels"][0] for r in before["results"][0]["result"]}
    assert labels and labels <= {"A", "B", ".", ".."}
    store = b.root / "store"
    good = next(store.glob("1/*/26.npz"))
    with np.load(good) as z:
        bad = {k: z[k] for k in z.files}
    bad["support"] = np.zeros((3, 17, 17), np.float32)
    np.savez(good.with_name("99.npz"), **bad)
    b.stop()
    b2 = Backend(model_dir, store, "--basic-auth-user", AUTH[0], "--basic-auth-pass", AUTH[1], "--ls-url", ls.url,
                 "--ls-token", TOKEN, "--allow-image-host", other.url.split("//")[1])
    try:
        after = b2.post("/predict", cfg).json()
        assert after["model_version"] == before["model_version"]
        assert [r["value"]["brushlabels"] for r in after["results"][0]["result"]] == \
            [r["value"]["brushlabels"] for r in before["results"][0]["result"]]
        assert [brush_mask(r).sum() for r in after["results"][0]["result"]] == \
            [brush_mask(r).sum() for r in before["results"][0]["result"]]
        assert "99.npz is not an example for this model" in b2.log.read_text()
    finally:
        b2.stop()


def personal_access_token(ls: str) -> str:
    """A personal access token, as a user gets one in Label Studio's UI (Account & Settings): log in, POST
    /api/token/."""
    c = httpx.Client(base_url=ls, timeout=60)
    c.get("/user/login/")
    r = c.post("/user/login/", data={"email": LS_USER[0], "password": LS_USER[1],
                                     "csrfmiddlewaretoken": c.cookies["csrftoken"]}, headers={"Referer": ls + "/user/login/"})
    assert r.status_code in (200, 302), r.text[:300]
    r = c.post("/api/token/", headers={"X-CSRFToken": c.cookies["csrftoken"], "Referer": ls + "/"})
    assert r.status_code == 201, r.text
    return r.json()["token"]


def wait_for(what: str, check, seconds: float = 45):
    deadline = time.time() + seconds
    while not (out := check()):
        assert time.time() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.25)
    return out


@pytest.mark.skipif(not LS_READY.exists(),
                    reason="Label Studio's environment is missing: `make test` makes it (.venv-labelstudio)")
def test_label_studio_round_trip_with_the_ml_backend(model_dir, tmp_path, monkeypatch):  # noqa: F811
    """Issue 36: a real Label Studio 1.23.2 on its defaults (legacy tokens off) with only the settings docs/annotate.md
    names: images uploaded to Label Studio, one annotation made BEFORE the backend is connected, a personal access
    token, basic auth. Then: the webhook exists (with the backend's basic auth), the old annotation is an example,
    a new one arrives by webhook, predictions equal serving.predict's label maps pixel for pixel, one prediction a
    task, its model version stable across a round without new annotations and changed after one; an unreadable
    image is named in the log only. The file path (`serving.predict --format labelstudio`) imports through a Local
    Files storage."""
    import shutil
    from serving.predict import predict
    web = tmp_path / "web"
    web.mkdir()
    A, B = 4, 13          # two classes of the generated val images: annotated on img3 and img7, predicted on the others
    truth = {}
    for i in (0, 3, 4, 7, 8, 10):
        img, lab = generate_image(i, "val", 60, 7)
        Image.fromarray(img).save(web / f"img{i}.png")
        truth[f"img{i}.png"] = np.where(lab == A, 1, np.where(lab == B, 2, 0))
        for c in (A, B):
            m = np.where(lab == c, 1, 0).astype(np.uint8)
            m[lab == 255] = 255
            Image.fromarray(m).save(tmp_path / f"img{i}_{c}.png")
    queries = ["img0.png", "img4.png", "img8.png", "img10.png"]
    procs = []

    def start(cmd, env=None, log=None):
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                      stderr=open(log, "w") if log else subprocess.PIPE))
        return procs[-1]
    try:
        backend_port, ls_port = _free_port(), _free_port()
        data = tmp_path / "ls"
        shutil.copytree(LS_VENV / "template", data)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "DJANGO"))}
        env.update(LABEL_STUDIO_BASE_DATA_DIR=str(data), DJANGO_DB="sqlite", SENTRY_DSN="", FRONTEND_SENTRY_DSN="",
                   COLLECT_ANALYTICS="false", LATEST_VERSION_CHECK="false",
                   # what docs/annotate.md says a team sets, and nothing else:
                   SSRF_PROTECTION_ENABLED="false", ML_BLOCK_LOCAL_IP="false",
                   LOCAL_FILES_SERVING_ENABLED="true", LOCAL_FILES_DOCUMENT_ROOT=str(tmp_path))
        p = start([str(LS_VENV / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
                   "--port", str(ls_port)], env=env)
        ls = f"http://127.0.0.1:{ls_port}"
        _wait_http(ls + "/version", p, "Label Studio", 120)
        pat = personal_access_token(ls)
        access = httpx.post(ls + "/api/token/refresh/", json={"refresh": pat}).raise_for_status().json()["access"]
        api = httpx.Client(base_url=ls, headers={"Authorization": f"Bearer {access}"}, timeout=60)
        assert httpx.get(ls + "/api/projects", headers={"Authorization": f"Token {pat}"}).status_code == 401
        config = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                  '<Label value="A"/><Label value="B"/></BrushLabels></View>')
        pid = api.post("/api/projects", json={"title": "few-shot", "label_config": config}).raise_for_status().json()["id"]
        files = [(f"file{i}", (n, (web / n).read_bytes(), "image/png")) for i, n in enumerate(sorted(truth))]
        api.post(f"/api/projects/{pid}/import", files=files).raise_for_status()
        api.post(f"/api/projects/{pid}/import", json=[{"image": f"/data/upload/{pid}/missing.png"}]).raise_for_status()
        tasks = api.get("/api/tasks", params={"project": pid, "page_size": 100}).raise_for_status().json()["tasks"]
        ids = {t["data"]["image"].rsplit("/", 1)[1].split("-", 1)[-1]: t["id"] for t in tasks}
        assert set(ids) == set(truth) | {"missing.png"} and all(t["data"]["image"].startswith("/data/upload/")
                                                                 for t in tasks)

        def annotate(image, label, mask_file):
            m = np.array(Image.open(mask_file)) == 1
            api.post(f"/api/tasks/{ids[image]}/annotations", json={"result": [region(label, m.astype(np.uint8))]}) \
                .raise_for_status()
        annotate("img3.png", "A", tmp_path / f"img3_{A}.png")          # before the backend exists
        store = tmp_path / "sets"
        user, password = AUTH
        p = start([sys.executable, "-m", "serving.labelstudio", "--model-dir", str(model_dir), "--backend",
                   "onnxruntime", "--port", str(backend_port), "--store", str(store), "--shots", "1", "--ls-url", ls,
                   "--ls-token", pat, "--basic-auth-user", user, "--basic-auth-pass", password],
                  env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), log=tmp_path / "backend.log")
        backend = f"http://127.0.0.1:{backend_port}"
        _wait_http(backend + "/health", p, "the ML backend")
        r = api.post("/api/ml", json={"url": backend, "project": pid, "title": "svf-fss", "auth_method": "BASIC_AUTH",
                                      "basic_auth_user": user, "basic_auth_pass": password})
        assert r.status_code == 201, r.text
        wait_for("the annotation made before connecting", lambda: len(list(store.glob("*/*/*.npz"))) == 1)
        hook = wait_for("the webhook with basic auth", lambda: [
            h for h in api.get("/api/webhooks/", params={"project": pid}).json()
            if h["url"] == backend + "/webhook" and h["headers"].get("Authorization", "").startswith("Basic ")])
        assert len(hook) == 1
        annotate("img7.png", "B", tmp_path / f"img7_{B}.png")
        wait_for("the webhook's annotation", lambda: len(list(store.glob("*/*/*.npz"))) == 2)
        assert httpx.get(backend + "/health", auth=AUTH).json()["problems"] == []
        wanted = [ids[q] for q in queries] + [ids["missing.png"]]

        def round_of_predictions():
            r = api.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                         json={"selectedItems": {"all": False, "included": wanted}})
            assert r.status_code == 200, r.text

        def predictions(old_version=None):
            """{query: its prediction} once every query task has exactly one, of a version other than old."""
            out = {}
            for q in queries:
                preds = api.get("/api/predictions/", params={"task": ids[q]}).json()
                if len(preds) != 1 or preds[0]["model_version"] == old_version:
                    return None
                out[q] = preds[0]
            return out
        round_of_predictions()
        first = wait_for("one prediction per task", predictions)
        out = tmp_path / "direct"
        predict(model_dir, [str(web / "img3.png"), str(web / "img7.png")],
                [str(tmp_path / f"img3_{A}.png"), str(tmp_path / f"img7_{B}.png")], [str(web / q) for q in queries],
                out, "onnxruntime", overlays=False, progress=False, classes=["A", "B"])
        inter, union = np.zeros(2), np.zeros(2)
        for name, pred in first.items():
            got = np.zeros((60, 60), np.uint8)
            for reg in pred["result"]:
                got[brush_mask(reg) == 1] = {"A": 1, "B": 2}[reg["value"]["brushlabels"][0]]
                assert reg["meta"]["text"][0].startswith("svf-fss: from annotation")
            want = np.array(Image.open(out / name))
            assert np.array_equal(got, want), (name, (got != want).sum())
            for k in (1, 2):        # scored against the truth: the same as serving.predict's, pixel for pixel
                inter[k - 1] += ((got == k) & (truth[name] == k)).sum()
                union[k - 1] += ((got == k) | (truth[name] == k)).sum()
        iou = inter / np.maximum(union, 1)
        print(f"Label Studio round trip: IoU of A, B over the {len(queries)} pre-annotated tasks "
              f"{np.round(100 * iou, 1).tolist()}")
        assert union.all() and np.isfinite(iou).all()
        assert all(not p["result"] for p in api.get("/api/predictions/", params={"task": ids["missing.png"]}).json())
        assert "missing.png: HTTP 5" in (tmp_path / "backend.log").read_text()
        version = {p["model_version"] for p in first.values()}
        assert len(version) == 1
        round_of_predictions()                        # nothing new annotated: the same version, one prediction a task
        time.sleep(2)
        again = wait_for("one prediction per task", predictions)
        assert {p["model_version"] for p in again.values()} == version
        annotate("img0.png", "A", tmp_path / f"img0_{A}.png")    # A's set changes (one shot: the newest)
        wait_for("the new annotation", lambda: len(list(store.glob("*/*/*.npz"))) == 3)
        round_of_predictions()
        third = wait_for("one prediction per task of a new version", lambda: predictions(version.copy().pop()))
        assert len({p["model_version"] for p in third.values()}) == 1
        assert httpx.get(backend + "/health").json()["status"] == "UP"
        # the file path: serving.predict's task file, images in a Local Files storage under the document root
        monkeypatch.chdir(tmp_path)
        pid2 = api.post("/api/projects", json={"title": "offline", "label_config": config}).json()["id"]
        r = api.post("/api/storages/localfiles/", json={"project": pid2, "path": str(web), "title": "photos"})
        assert r.status_code == 201, r.text
        predict(model_dir, [str(web / "img3.png")], [str(tmp_path / f"img3_{A}.png")], ["web/img0.png"],
                tmp_path / "lsfile", "onnxruntime", fmt="labelstudio", overlays=False, progress=False, classes=["A"])
        payload = json.loads((tmp_path / "lsfile" / "labelstudio.json").read_text())
        r = api.post(f"/api/projects/{pid2}/import", json=payload).raise_for_status().json()
        assert r["task_count"] == 1 and r["prediction_count"] == 1
        task = api.get("/api/tasks", params={"project": pid2}).json()["tasks"][0]
        assert task["data"]["image"] == "/data/local-files/?d=web/img0.png"
        assert api.get(task["data"]["image"]).content == (web / "img0.png").read_bytes()
        pred = api.get("/api/predictions/", params={"task": task["id"]}).json()[0]
        assert pred["model_version"].startswith("svf-fss-file-")
        predict(model_dir, [str(web / "img3.png")], [str(tmp_path / f"img3_{A}.png")], ["web/img0.png"],
                tmp_path / "png", "onnxruntime", overlays=False, progress=False, classes=["A"])
        assert np.array_equal(brush_mask(pred["result"][0]), np.array(Image.open(tmp_path / "png" / "img0.png")))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.skipif(not LS_READY.exists(),
                    reason="Label Studio's environment is missing: `make test` makes it (.venv-labelstudio)")
def test_the_brush_codec_agrees_with_label_studio_sdk(tmp_path):
    """Issue 36, item 8: masks (random, blocks, empty, full, runs over 65,536, odd sizes) encoded by the project and
    by label-studio-sdk's converter (in Label Studio's own environment): the same bytes, and each side decodes the
    other's stream to the mask."""
    from serving.labelstudio import rle_decode
    rng = np.random.default_rng(0)
    masks = [np.zeros((40, 50), np.uint8), np.ones((300, 300), np.uint8), np.ones((1, 1), np.uint8)]
    for i in range(60):
        h, w = rng.integers(1, 120, 2)
        kind = i % 3
        if kind == 0:
            m = rng.random((h, w)) < rng.random()
        elif kind == 1:
            m = np.zeros((h, w), bool)
            m[rng.integers(0, h):rng.integers(0, h + 1), rng.integers(0, w):rng.integers(0, w + 1)] = True
        else:
            m = np.kron(rng.random((h // 8 + 1, w // 8 + 1)) < 0.5, np.ones((8, 8), bool))[:h, :w]
        masks.append(m.astype(np.uint8))
    np.savez(tmp_path / "masks.npz", *masks)
    ours = [rle_encode(np.repeat(m.ravel() * np.uint8(255), 4)) for m in masks]
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    script = (
        "import json, sys, numpy as np\n"
        "from label_studio_sdk.converter.brush import decode_rle, mask2rle\n"
        "z = np.load(sys.argv[1] + '/masks.npz')\n"
        "masks = [z[f'arr_{i}'] for i in range(len(z.files))]\n"
        "ours = json.load(open(sys.argv[1] + '/ours.json'))\n"
        "out = {'sdk': [mask2rle(m * np.uint8(255)) for m in masks],\n"
        "       'decoded': [decode_rle(r).reshape(m.shape[0], m.shape[1], 4)[:, :, 3].tolist() for r, m in zip(ours, masks)]}\n"
        "json.dump(out, open(sys.argv[1] + '/sdk.json', 'w'))\n")
    subprocess.run([str(LS_VENV / "bin" / "python"), "-c", script, str(tmp_path)], check=True, timeout=300)
    sdk = json.loads((tmp_path / "sdk.json").read_text())
    for i, m in enumerate(masks):
        assert sdk["sdk"][i] == ours[i], f"mask {i} {m.shape}: the bytes differ"
        assert np.array_equal(rle_decode(sdk["sdk"][i]).reshape(*m.shape, 4)[:, :, 3], m * 255), i
        assert np.array_equal(np.array(sdk["decoded"][i], np.uint8), m * 255), i
    print(f"brush codec: {len(masks)} masks, identical bytes and decodes both ways")
