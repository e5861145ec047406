"""The Label Studio ML backend (python -m serving.labelstudio) on 127.0.0.1 under hostile and careless input:
its store, its token, its fetches, its memory and event loop, its answers to malformed events."""
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
LS_TOKEN = "svf-fss-tests-token"       # the Makefile's `label-studio init`


class Site:
    """A web server on 127.0.0.1 that records every request (path, Authorization) and serves generated PNGs
    at any path ending in <n>.png; /redirect?to=URL redirects, /slow.png trickles a byte every 0.3 s."""

    def __init__(self):
        self.seen: list[tuple[str, str | None]] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                site.seen.append((self.path, self.headers.get("Authorization")))
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
                name = self.path.rsplit("/", 1)[-1]
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
        _wait_http(self.url + "/health", self.proc, "the ML backend")
        self.http = httpx.Client(base_url=self.url, auth=AUTH, timeout=60)

    def post(self, path, body, **kw):
        return self.http.post(path, json=body, **kw)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(15)


@pytest.fixture(scope="module")
def sites():
    ls, other, evil = Site(), Site(), Site()
    yield ls, other, evil
    for s in (ls, other, evil):
        s.stop()


@pytest.fixture(scope="module")
def ls_backend(model_dir, sites, tmp_path_factory):  # noqa: F811
    """No --ls-url: the first /setup that passes pins Label Studio's host; one other image host allowed."""
    d = tmp_path_factory.mktemp("lsb")
    _, other, _ = sites
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
    ls, _, evil = sites
    b = ls_backend
    r = b.post("/setup", {"project": "1.1700000000", "schema": "<View/>", "hostname": evil.url, "access_token": "x"})
    assert r.status_code == 400 and "BrushLabels" in r.json()["error"]
    r = b.post("/setup", {"project": 1, "schema": CONFIG, "hostname": ls.url, "access_token": TOKEN})
    assert r.status_code == 200, r.text
    r = b.post("/setup", {"project": 2, "schema": CONFIG, "hostname": evil.url, "access_token": "stolen?"})
    assert r.status_code == 403 and "--ls-url" in r.json()["error"]
    r = b.post("/webhook", event(1, 11, "/data/upload/1/3.png", [region("A", disc())]))
    assert r.status_code == 200, r.text
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
        assert r.status_code == 200, r.text
    assert tree(b.root) - {p for p in tree(b.root) if p.startswith("store")} == outside
    assert not Path("/x/y").exists() and not (b.root / "escape").exists()
    files = sorted(p.relative_to(store).parts for p in store.rglob("*.npz"))
    assert all(len(parts) == 3 and parts[0] == "1" and len(parts[1]) == 32 for parts in files), files
    assert {p[2] for p in files} >= {"26.npz", "27.npz"}


def test_only_label_studio_and_allowed_hosts_are_fetched_and_errors_tell_nothing(ls_backend, sites):
    """Item 4: a URL on a host not allowed is never requested, a redirect off the allowed hosts is not followed,
    and every failure answers the same generic error (what answered stays in the log)."""
    ls, other, evil = sites
    b = ls_backend
    dead = f"http://127.0.0.1:{_free_port()}/1.png"
    errors = set()
    for url in (evil.url + "/1.png", dead, other.url + "/redirect?to=" + evil.url + "/2.png", "file:///etc/passwd",
                other.url + "/nothing.txt", "http://[::1]:1/x.png"):
        r = b.post("/webhook", event(1, 31, url, [region("A", disc())]))
        assert r.status_code == 400, (url, r.text)
        errors.add(r.json()["error"])
    assert errors == {"the task's image could not be read (the backend's log says why)"}
    assert evil.seen == []
    r = b.post("/webhook", event(1, 32, other.url + "/4.png", [region("B", disc())]))
    assert r.status_code == 200, r.text
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
    assert r.status_code == 200 and slowest < took / 3, (r.text, slowest, took)


def test_bodies_nesting_labels_and_slow_images_are_bounded(ls_backend, sites):
    """Item 7: a body over the limit is 413 before it is read; JSON nested 100,000 deep is a 400; a config of
    20,000 labels is checked in linear time off the loop; an image that trickles is cut at --fetch-timeout while
    other webhooks are answered."""
    _, other, _ = sites
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
    assert r.status_code == 200 and time.perf_counter() - t < 2, r.text
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
    assert b.post("/webhook", good).status_code == 200
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


def test_a_restart_keeps_every_label_and_skips_bad_examples(ls_backend, model_dir, sites):  # noqa: F811
    """Items 9 and 10: after a restart the sets of '.', '..' and the others are back; an example of another size
    (a file put in the store) is named in the log and skipped, and predictions go on."""
    ls, other, _ = sites
    b = ls_backend
    for ann, label in ((26, "."), (27, "..")):
        assert b.post("/webhook", event(1, ann, sites[1].url + "/7.png", [region(label, disc())])).status_code == 200
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


@pytest.mark.skipif(not (LS_VENV / ".installed").exists(),
                    reason="Label Studio's environment is missing: `make test` makes it (.venv-labelstudio)")
def test_label_studio_round_trip_with_the_ml_backend(model_dir, tmp_path, monkeypatch):
    """A real Label Studio on 127.0.0.1: a BrushLabels project, the ML backend connected, one brush annotation per
    class submitted through the API become the support sets, the other tasks pre-annotated; decoded, the regions are
    the label maps serving.predict makes from the same examples. `serving.predict --format labelstudio` imports as
    pre-annotations. Bad input: an annotation without a brush region, an unreadable image URL: named, nothing
    stored, the backend keeps answering."""
    import shutil
    import httpx
    from serving.labelstudio import brush_mask, rle_encode
    from serving.predict import predict
    web = tmp_path / "web"
    web.mkdir()
    A, B = 4, 13          # two classes of the generated val images: annotated on img3 and img7, predicted on the others
    truth, masks = {}, {}
    for i in (0, 3, 4, 7, 8, 10):
        img, lab = generate_image(i, "val", 60, 7)
        Image.fromarray(img).save(web / f"img{i}.png")
        truth[f"img{i}.png"] = np.where(lab == A, 1, np.where(lab == B, 2, 0))
        for c in (A, B):
            m = np.where(lab == c, 1, 0).astype(np.uint8)
            m[lab == 255] = 255
            Image.fromarray(m).save(tmp_path / f"img{i}_{c}.png")
    supports = [(web / "img3.png", tmp_path / f"img3_{A}.png"), (web / "img7.png", tmp_path / f"img7_{B}.png")]
    queries = ["img0.png", "img4.png", "img8.png", "img10.png"]
    procs = []

    def start(cmd, env=None, cwd=None):
        procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        return procs[-1]
    try:
        files_port, backend_port, ls_port = _free_port(), _free_port(), _free_port()
        files = f"http://127.0.0.1:{files_port}"
        p = start([sys.executable, "-m", "http.server", str(files_port), "--bind", "127.0.0.1", "-d", str(web)])
        _wait_http(files + "/img0.png", p, "the image server")
        p = start([sys.executable, "-m", "serving.labelstudio", "--model-dir", str(model_dir), "--backend", "onnxruntime",
                   "--port", str(backend_port), "--store", str(tmp_path / "sets"), "--shots", "1",
                   "--allow-image-host", f"127.0.0.1:{files_port}"],
                  env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), cwd=ROOT)
        backend = f"http://127.0.0.1:{backend_port}"
        _wait_http(backend + "/health", p, "the ML backend")
        data = tmp_path / "ls"
        shutil.copytree(LS_VENV / "template", data)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "DJANGO"))}
        env.update(LABEL_STUDIO_BASE_DATA_DIR=str(data), DJANGO_DB="sqlite", SENTRY_DSN="", FRONTEND_SENTRY_DSN="",
                   COLLECT_ANALYTICS="false", LATEST_VERSION_CHECK="false", ML_BLOCK_LOCAL_IP="false",
                   SSRF_PROTECTION_ENABLED="false")
        p = start([str(LS_VENV / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
                   "--port", str(ls_port)], env=env, cwd=tmp_path)
        ls = f"http://127.0.0.1:{ls_port}"
        _wait_http(ls + "/version", p, "Label Studio", 120)
        api = httpx.Client(base_url=ls, headers={"Authorization": f"Token {LS_TOKEN}"}, timeout=60)
        config = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
                  '<Label value="A"/><Label value="B"/></BrushLabels></View>')
        pid = api.post("/api/projects", json={"title": "few-shot", "label_config": config}).raise_for_status().json()["id"]
        r = api.post("/api/ml", json={"url": backend, "project": pid, "title": "svf-fss"})
        assert r.status_code == 201, r.text
        tasks = [{"image": f"{files}/{n}"} for n in sorted(truth)] + [{"image": f"{files}/missing.png"}]
        api.post(f"/api/projects/{pid}/import", json=tasks).raise_for_status()
        ids = {t["data"]["image"].rsplit("/", 1)[1]: t["id"] for t in
               api.get("/api/tasks", params={"project": pid, "page_size": 100}).raise_for_status().json()["tasks"]}

        def region(label, mask_file):
            m = np.array(Image.open(mask_file)) == 1
            return {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": m.shape[1],
                    "original_height": m.shape[0], "image_rotation": 0,
                    "value": {"format": "rle", "rle": rle_encode(np.repeat(m.ravel() * np.uint8(255), 4)),
                              "brushlabels": [label]}}
        # an annotation without a brush region: answered, nothing stored
        api.post(f"/api/tasks/{ids['img3.png']}/annotations", json={"result": []}).raise_for_status()
        assert not list((tmp_path / "sets").glob("**/*.npz"))
        for name, (image, mask) in zip("AB", supports):
            api.post(f"/api/tasks/{ids[image.name]}/annotations", json={"result": [region(name, mask)]}).raise_for_status()
        assert len(list((tmp_path / "sets").glob("*/*/*.npz"))) == 2
        wanted = [ids[q] for q in queries] + [ids["missing.png"]]
        r = api.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                     json={"selectedItems": {"all": False, "included": wanted}})
        assert r.status_code == 200, r.text
        out = tmp_path / "direct"
        predict(model_dir, [str(s) for s, _ in supports], [str(m) for _, m in supports], [str(web / q) for q in queries],
                out, "onnxruntime", overlays=False, progress=False, classes=["A", "B"])
        inter, union = np.zeros(2), np.zeros(2)
        for name in queries:
            preds = api.get("/api/predictions", params={"task": ids[name]}).raise_for_status().json()
            assert len(preds) == 1, preds
            got = np.zeros((60, 60), np.uint8)
            for reg in preds[0]["result"]:
                got[brush_mask(reg) == 1] = {"A": 1, "B": 2}[reg["value"]["brushlabels"][0]]
            want = np.array(Image.open(out / name))
            assert np.array_equal(got, want), (name, (got != want).sum())
            for k in (1, 2):        # scored against the truth: the same as serving.predict's, pixel for pixel
                inter[k - 1] += ((got == k) & (truth[name] == k)).sum()
                union[k - 1] += ((got == k) | (truth[name] == k)).sum()
        iou = inter / np.maximum(union, 1)
        print(f"Label Studio round trip: IoU of A, B over the {len(queries)} pre-annotated tasks "
              f"{np.round(100 * iou, 1).tolist()}")
        assert union.all() and np.isfinite(iou).all()
        assert not api.get("/api/predictions", params={"task": ids["missing.png"]}).json() or \
            all(not p["result"] for p in api.get("/api/predictions", params={"task": ids["missing.png"]}).json())
        assert httpx.get(backend + "/health").json()["status"] == "UP"
        # the offline path: serving.predict's task file imported as pre-annotations
        monkeypatch.chdir(web)
        predict(model_dir, [str(supports[0][0])], [str(supports[0][1])], ["img0.png"], tmp_path / "lsfile", "onnxruntime",
                fmt="labelstudio", overlays=False, progress=False, classes=["A"], image_url=files + "/")
        payload = json.loads((tmp_path / "lsfile" / "labelstudio.json").read_text())
        pid2 = api.post("/api/projects", json={"title": "offline", "label_config": config}).json()["id"]
        r = api.post(f"/api/projects/{pid2}/import", json=payload).raise_for_status().json()
        assert r["task_count"] == 1 and r["prediction_count"] == 1
        task = api.get("/api/tasks", params={"project": pid2}).json()["tasks"][0]
        assert task["data"]["image"] == files + "/img0.png"
        reg = api.get("/api/predictions", params={"task": task["id"]}).json()[0]["result"][0]
        predict(model_dir, [str(supports[0][0])], [str(supports[0][1])], ["img0.png"], tmp_path / "png", "onnxruntime",
                overlays=False, progress=False, classes=["A"])
        assert np.array_equal(brush_mask(reg), np.array(Image.open(tmp_path / "png" / "img0.png")))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
