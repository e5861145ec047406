"""The real service on 127.0.0.1: answers, bad input, concurrency."""
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.synthetic import generate_image

ROOT = Path(__file__).resolve().parents[1]
SIZE = 48


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if os.environ.get("SVF_FSS_MODEL_DIR"):   # a trained model instead, for docs/annotate.md's figures (only the
        return Path(os.environ["SVF_FSS_MODEL_DIR"])   # page, Label Studio and MLflow tests are size-free)
    from export.onnx_export import export_split
    from conftest import small_merged_model
    from pipeline import adapter as adapter_io
    d = tmp_path_factory.mktemp("served")
    merged, cfg = small_merged_model("resnet18", SIZE)
    adapter_io.save(adapter_io.merged_state(merged, cfg), d / "merged.pt")
    export_split(merged, d, SIZE, 18, {"input_size": [SIZE, SIZE]}, "torchscript")
    return d


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, backend, *flags, store=None):
        import tempfile
        self.own_store = store is None      # made here, removed by stop()
        self.store = store or tempfile.mkdtemp(prefix="svf-sets-")
        flags = (*flags, "--store", str(self.store))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "serving", "--model-dir", str(model_dir), "--backend",
                                      backend, "--port", str(self.port), *flags], env=env, cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        import httpx
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode()[-3000:])
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        if self.own_store:
            import shutil
            shutil.rmtree(self.store, ignore_errors=True)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "torch", "--max-shots", "3", "--max-upload-mb", "0.2", "--max-pixels", "40000")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def episode(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    files = {}
    for i in range(4):
        img, lab = generate_image(i, "val", 60, 7)
        cls = int(next(c for c in np.unique(lab) if c not in (0, 255)))
        Image.fromarray(img).save(d / f"img{i}.png")
        m = np.where(lab == cls, 1, 0).astype(np.uint8)
        m[lab == 255] = 255
        Image.fromarray(m).save(d / f"mask{i}.png")
        files[i] = (d / f"img{i}.png", d / f"mask{i}.png")
    return files


def expected_mask(model_dir, query: Path, supports, masks) -> np.ndarray:
    from pipeline import adapter as adapter_io
    from pipeline.data.episodes import eval_transform
    from pipeline.evaluate import predict_original
    model, _ = adapter_io.load_merged(model_dir / "merged.pt")
    q = torch.from_numpy(np.array(Image.open(query).convert("RGB"))).permute(2, 0, 1)
    h, w = q.shape[1:]
    xq, _, valid = eval_transform(q, torch.zeros(h, w, dtype=torch.uint8), SIZE)
    xs, ms = [], []
    for s, m in zip(supports, masks):
        x, mm, _ = eval_transform(torch.from_numpy(np.array(Image.open(s).convert("RGB"))).permute(2, 0, 1),
                                  torch.from_numpy(np.array(Image.open(m))), SIZE)
        xs.append(x)
        ms.append((mm == 1).float())
    with torch.no_grad():
        logits = model(xq[None], torch.stack(xs)[None], torch.stack(ms)[None])[0]
    return predict_original(logits, valid, (h, w)).numpy().astype(np.uint8)


def test_masks_equal_the_in_process_model(server, model_dir, episode):
    from serving.client import Client
    c = Client(server.url)
    q, _ = episode[0]
    sup, msk = [episode[1][0], episode[2][0]], [episode[1][1], episode[2][1]]
    png = np.array(Image.open(io.BytesIO(c.segment(q, sup, msk))))
    want = expected_mask(model_dir, q, sup, msk)
    assert png.shape == want.shape == (60, 60)
    assert np.array_equal(png // 255, want)
    js = c.segment(q, sup, msk, fmt="json")
    from pycocotools import mask as mask_utils
    dec = mask_utils.decode({"size": js["rle"]["size"], "counts": js["rle"]["counts"].encode()})
    assert np.array_equal(dec, want) and js["area"] == int(want.sum())
    # a registered support set gives the same answer
    assert c.register("cls", sup, msk) == {"name": "cls", "shots": 2}
    assert np.array_equal(np.array(Image.open(io.BytesIO(c.segment_with("cls", q)))), png)


def test_the_batcher_sends_waiting_queries_at_once_and_holds_only_a_fresh_one():
    """A batch closes when full or when its oldest query's window, counted from its arrival, is over:
    queries that queued while the backend was busy go without another wait; a query arriving at an idle
    backend waits the window for company."""
    import asyncio
    from serving.app import Batcher, Limits, Pending

    async def run():
        loop = asyncio.get_running_loop()
        b = Batcher(None, Limits(batch_window_ms=300, max_batch=4), None)
        b.queue = asyncio.Queue()

        def put(age: float):
            b.queue.put_nowait(Pending(np.zeros(1), (), loop.create_future(), loop.time() - age))

        async def timed():
            t = loop.time()
            batch = await b.collect()
            return len(batch), loop.time() - t
        for _ in range(3):
            put(1.0)                      # queued during a backend call: their window is over
        waited = [await timed()]
        for _ in range(6):
            put(0.0)
        waited += [await timed(), await timed()]    # a full batch at once, then the two left wait
        put(0.0)
        loop.call_later(0.1, put, 0.0)    # arrives within the first one's window: joins it
        return waited + [await timed()]
    (n_old, t_old), (n_full, t_full), (n_rest, t_rest), (n_lone, t_lone) = asyncio.run(run())
    assert (n_old, n_full, n_rest, n_lone) == (3, 4, 2, 2)
    assert t_old < 0.1 and t_full < 0.1, (t_old, t_full)
    assert 0.28 < t_rest < 2 and 0.28 < t_lone < 2, (t_rest, t_lone)


def test_a_request_that_breaks_its_batch_fails_alone(model_dir):
    """A set whose features the backend refuses (float64 here) co-batched with healthy ones: the batch fails, its
    requests rerun one by one, the healthy ones answer as if alone and only the bad one fails."""
    import asyncio
    from prometheus_client import Histogram, CollectorRegistry
    from serving.app import Batcher, Limits
    from serving.backends import load_backend
    b = load_backend(model_dir, "onnxruntime")
    g = np.random.default_rng(1)
    good = b.encode(g.standard_normal((1, 1, 3, SIZE, SIZE)).astype(np.float32), np.ones((1, 1, SIZE, SIZE), np.float32))
    bad = tuple(f.astype(np.float64) for f in good)
    q = g.standard_normal((3, 1, 3, SIZE, SIZE)).astype(np.float32)

    async def run():
        bt = Batcher(b, Limits(batch_window_ms=50), Histogram("h", "h", registry=CollectorRegistry()))
        bt.start()
        try:
            return await asyncio.gather(bt.decode(q[0], good), bt.decode(q[1], bad), bt.decode(q[2], good),
                                        return_exceptions=True)
        finally:
            await bt.stop()
    first, broken, third = asyncio.run(run())
    assert isinstance(broken, Exception) and not isinstance(first, Exception) and not isinstance(third, Exception)
    np.testing.assert_allclose(first, b.decode(q[0], good), rtol=0, atol=1e-5)
    np.testing.assert_allclose(third, b.decode(q[2], good), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_a_set_shared_by_a_batch_decodes_as_if_stacked(model_dir, name):
    """The batcher passes a registered set's features once for all its queries; decode broadcasts them."""
    from serving.backends import Backend, load_backend
    b = load_backend(model_dir, name)
    g = np.random.default_rng(0)
    feats = b.encode(g.standard_normal((1, 1, 3, SIZE, SIZE)).astype(np.float32),
                     (g.random((1, 1, SIZE, SIZE)) > 0.5).astype(np.float32))
    other = b.encode(g.standard_normal((1, 1, 3, SIZE, SIZE)).astype(np.float32),
                     (g.random((1, 1, SIZE, SIZE)) > 0.5).astype(np.float32))
    q = g.standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    assert Backend.batch_features([feats] * 3) is feats
    stacked = b.decode(q, tuple(np.concatenate([f] * 3) for f in feats))
    np.testing.assert_allclose(b.decode(q, feats), stacked, rtol=0, atol=1e-5)
    mixed = b.decode(q, Backend.batch_features([feats, other, feats]))
    np.testing.assert_allclose(mixed[[0, 2]], stacked[[0, 2]], rtol=0, atol=1e-5)
    np.testing.assert_allclose(mixed[1], b.decode(q[1:2], other)[0], rtol=0, atol=1e-5)


def test_bad_inputs_answer_4xx_json(server, episode, tmp_path):
    import httpx
    q, m0 = episode[0]
    s, m = episode[1]
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(big)           # 90,000 px > 40,000
    small_mask = tmp_path / "small.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(small_mask)
    gray_mask = tmp_path / "gray.png"
    Image.fromarray(np.full((60, 60), 7, np.uint8)).save(gray_mask)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really")
    huge = tmp_path / "huge.bin"
    huge.write_bytes(os.urandom(300_000))                                  # > 0.2 MB upload

    def post(path="/v1/segment", **files):
        parts = [(k.rstrip("_0123456789"), (Path(v).name, Path(v).read_bytes())) for k, v in files.items()]
        return httpx.post(server.url + path, files=parts, timeout=30)

    cases = {
        "corrupt": (post(query=junk, supports=s, masks=m), 400, "not a readable image"),
        "size": (post(query=q, supports=s, masks=small_mask), 400, "10x10 but its image is 60x60"),
        "nonbinary": (post(query=q, supports=s, masks=gray_mask), 400, "not binary"),
        "zero": (post(query=q), 400, "zero shots"),
        "too_many": (post(query=q, supports_1=s, supports_2=s, supports_3=s, supports_4=s, masks_1=m, masks_2=m,
                          masks_3=m, masks_4=m), 400, "at most 3"),
        "pixels": (post(query=big, supports=s, masks=m), 413, "limit"),
        "upload": (post(query=huge, supports=s, masks=m), 413, "exceeds the limit"),
        "unknown_set": (post("/v1/support-sets/nope/segment", query=q), 404, "no support set named"),
        "mask_count": (post(query=q, supports=s), 400, "one mask per support"),
    }
    for name, (r, status, text) in cases.items():
        assert r.status_code == status, (name, r.status_code, r.text)
        assert text in r.json()["error"], (name, r.json())
    assert httpx.get(server.url + "/readyz").status_code == 200      # still alive


def test_twenty_concurrent_clients_without_error(server, episode):
    import httpx
    q, _ = episode[0]
    s, m = episode[1]
    files = [("query", ("q.png", q.read_bytes())), ("supports", ("s.png", s.read_bytes())),
             ("masks", ("m.png", m.read_bytes()))]
    errors, done = [], []
    stop = time.time() + 6

    def worker():
        with httpx.Client(base_url=server.url, timeout=60) as c:
            while time.time() < stop:
                r = c.post("/v1/segment", files=files)
                (done if r.status_code == 200 else errors).append(r.status_code)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(done) >= 20
    metrics = httpx.get(server.url + "/metrics").text
    assert 'svf_requests_total{endpoint="/v1/segment",status="200"}' in metrics
    batches = [line for line in metrics.splitlines() if line.startswith("svf_batch_size_count")]
    count = float(batches[0].split()[-1])
    assert 0 < count <= len(done)       # concurrent requests shared backend calls or not, all were answered


def test_openapi_and_onnx_backend_agrees(model_dir, episode):
    import httpx
    srv = Server(model_dir, "onnxruntime")
    try:
        schema = httpx.get(srv.url + "/openapi.json").json()
        assert {"/v1/segment", "/v1/support-sets/{name}", "/v1/support-sets/{name}/segment", "/readyz",
                "/healthz", "/metrics"} <= set(schema["paths"])
        assert "onnxruntime" in httpx.get(srv.url + "/readyz").json()["backend"]
        # the API docs load their scripts from the service itself, not from a CDN
        for page, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
            html = httpx.get(srv.url + page).text
            assert "cdn." not in html and "http://" not in html.replace(srv.url, "") and "https://" not in html
            src = next(part.split('"')[0] for part in html.split('src="')[1:] if asset in part)
            js = httpx.get(srv.url + src)
            assert js.status_code == 200 and len(js.content) > 100_000
        from serving.client import Client
        q, _ = episode[3]
        got = np.array(Image.open(io.BytesIO(Client(srv.url).segment(q, [episode[1][0]], [episode[1][1]])))) // 255
        want = expected_mask(model_dir, q, [episode[1][0]], [episode[1][1]])
        assert (got == want).mean() > 0.999
    finally:
        srv.stop()


def test_overlay_threshold_openapi_and_the_command_line_agree(model_dir, episode, tmp_path):
    """format=overlay is the query with the service's own mask drawn; the OpenAPI schema lists format's
    choices and the PNG answer; a JPEG mask is refused unless mask_threshold binarises it; and
    `python -m serving.predict` (no server) writes the service's masks, overlays and RLE."""
    import httpx
    from pycocotools import mask as mask_utils
    from pipeline.figures import overlay
    from serving.client import Client, ServiceError
    q, _ = episode[0]
    s, m = episode[1]
    jpeg_mask = tmp_path / "mask.jpg"
    Image.fromarray(np.array(Image.open(m)).clip(0, 1).astype(np.uint8) * 255).save(jpeg_mask, quality=70)
    srv = Server(model_dir, "onnxruntime")
    try:
        c = Client(srv.url)
        schema = httpx.get(srv.url + "/openapi.json").json()
        op = schema["paths"]["/v1/segment"]["post"]
        assert {"image/png", "application/json"} <= set(op["responses"]["200"]["content"])
        form = schema["components"]["schemas"][op["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
                                               .rsplit("/", 1)[-1]]
        assert form["properties"]["format"]["enum"] == ["png", "json", "overlay"]
        assert "mask_threshold" in form["properties"]

        mask = np.array(Image.open(io.BytesIO(c.segment(q, [s], [m])))) // 255
        drawn = np.array(Image.open(io.BytesIO(c.segment(q, [s], [m], fmt="overlay"))))
        assert np.array_equal(drawn, overlay(np.array(Image.open(q).convert("RGB")), mask))
        with pytest.raises(ServiceError, match="400.*not binary.*mask_threshold"):
            c.segment(q, [s], [jpeg_mask])
        thresholded = np.array(Image.open(io.BytesIO(c.segment(q, [s], [jpeg_mask], mask_threshold=0.5)))) // 255
        assert (thresholded == mask).mean() > 0.99
        for bad in ("2", "x"):
            r = httpx.post(srv.url + "/v1/segment", data={"mask_threshold": bad, "format": "png"},
                           files=Client._files(q, [s], [m]))
            assert r.status_code == 422 and "mask_threshold" in r.json()["error"]
        r = httpx.post(srv.url + "/v1/segment", data={"format": "gif"}, files=Client._files(q, [s], [m]))
        assert r.status_code == 422 and "format" in r.json()["error"]
    finally:
        srv.stop()

    queries = tmp_path / "queries"
    queries.mkdir()
    for i in (0, 2, 3):
        (queries / f"q{i}.png").write_bytes(episode[i][0].read_bytes())
    (queries / "notes.txt").write_text("not an image")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "serving.predict", "--model-dir", str(model_dir), "--backend",
                               "onnxruntime", *args], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                              capture_output=True, text=True, timeout=300)
    out = tmp_path / "pred"
    r = cli("--support", str(s), "--mask", str(jpeg_mask), "--mask-threshold", "0.5", "--query", str(queries),
            "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "notes.txt" in r.stderr and "3 queries segmented" in r.stdout
    assert sorted(f.name for f in out.iterdir()) == ["q0.png", "q0_overlay.png", "q2.png", "q2_overlay.png", "q3.png",
                                                     "q3_overlay.png"]
    assert np.array_equal(np.array(Image.open(out / "q0.png")) // 255, thresholded)
    r = cli("--support", str(s), "--mask", str(m), "--query", str(queries / "q0.png"), "--out", str(tmp_path / "rle"),
            "--format", "rle", "--no-overlay")
    assert r.returncode == 0, r.stderr
    import json
    entry = json.loads((tmp_path / "rle" / "masks.json").read_text())["masks"][0]
    rle = {"size": entry["rle"]["size"], "counts": entry["rle"]["counts"].encode()}
    assert entry["file"] == "q0.png" and np.array_equal(mask_utils.decode(rle), mask)

    (queries / "q9.png").write_bytes(b"\x89PNG broken")          # one unreadable query: nothing written
    before = sorted(f.name for f in out.iterdir())
    r = cli("--support", str(s), "--mask", str(m), "--query", str(queries), "--out", str(out))
    assert r.returncode == 1 and "q9.png" in r.stderr and "not a readable image" in r.stderr
    assert sorted(f.name for f in out.iterdir()) == before and not list(tmp_path.glob(".pred.*"))
    r = cli("--support", str(s), "--mask", str(jpeg_mask), "--query", str(queries / "q0.png"), "--out", str(out))
    assert r.returncode == 1 and "mask_threshold" in r.stderr


def test_the_readme_onnx_example_agrees_with_serving_predict(model_dir, episode, tmp_path):
    """The README's onnxruntime + numpy + Pillow example, run as written on an exported model, gives the
    masks of serving.predict on at least 99% of pixels (resampling differs at edges)."""
    from export.onnx_export import export_onnx
    from pipeline import adapter as adapter_io
    from serving.predict import predict
    from conftest import doc_text
    page, text = doc_text("onnx-example")
    code = text.split("```python", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(code, f"{page} (onnx-example)", "exec"), namespace)
    from serving.inputs import query_tensor, read_mask, read_image, support_tensors
    merged, cfg = adapter_io.load_merged(model_dir / "merged.pt")
    s, m = episode[1]
    big = tmp_path / "big.png"                         # another size and aspect than the model's input
    Image.open(episode[2][0]).resize((90, 70), Image.BILINEAR).save(big)
    queries = (episode[0][0], episode[3][0], big)
    # the untrained test model calls everything object: its last classifier bias is moved so that half
    # of these queries' pixels are object, or the comparison would hold trivially
    img = read_image(s.read_bytes(), "s", 1 << 24)
    sup = [torch.from_numpy(a) for a in support_tensors([img], [read_mask(m.read_bytes(), "m", img.shape[:2],
                                                                          1 << 24)], SIZE)]
    with torch.no_grad():
        margins = torch.cat([(lambda o: (o[0, 1] - o[0, 0]).flatten())(merged(torch.from_numpy(query_tensor(
            read_image(q.read_bytes(), "q", 1 << 24), SIZE)[0]), *sup)) for q in queries])
        last = [c for c in merged.modules() if isinstance(c, torch.nn.Conv2d) and c.out_channels == 2][-1]
        last.bias[1] -= margins.median()
    balanced = tmp_path / "balanced"
    balanced.mkdir()
    adapter_io.save(adapter_io.merged_state(merged, cfg), balanced / "merged.pt")
    onnx_path = export_onnx(merged, tmp_path / "model.onnx", SIZE, 18, {"input_size": [SIZE, SIZE]}, "torchscript")
    fractions = []
    for q in queries:
        got = namespace["segment"](str(onnx_path), q, s, m)
        predict(balanced, [s], [m], [q], tmp_path / "pred", backend="torch", overlays=False, progress=False)
        want = np.array(Image.open(tmp_path / "pred" / f"{q.stem}.png")) // 255
        assert got.shape == want.shape == np.array(Image.open(q)).shape[:2]
        assert (got == want).mean() >= 0.99, (got != want).mean()
        fractions.append(want.mean())
    assert 0.1 < np.mean(fractions) < 0.9, fractions


def test_missing_model_and_absent_service_say_what_to_do(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "serving", "--model-dir", str(tmp_path / "fold3" / "1shot")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "merged.pt" in r.stderr and "dvc repro export@3-1" in r.stderr and "split.folds" in r.stderr
    for flag, value, rule in (("--batch-window-ms", "-5", "0 or more"), ("--max-batch", "0", "more than 0")):
        r = subprocess.run([sys.executable, "-m", "serving", flag, value], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and f"{flag} {value}: must be {rule}" in r.stderr and "Traceback" not in r.stderr
    url = f"http://127.0.0.1:{_free_port()}"
    r = subprocess.run([sys.executable, "-m", "serving.client", "--url", url, "health"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and url in r.stderr and "make serve" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "serving.client", "--help"], env=env, capture_output=True, text=True)
    assert r.stdout.startswith("usage: python -m serving.client")


def _png(arr: np.ndarray, path: Path, **save) -> Path:
    Image.fromarray(arr).save(path, **save)
    return path


def _bomb_png(path: Path, side: int = 30000) -> Path:
    """A 1x1 PNG whose header declares side x side pixels: a few bytes that would decode to gigabytes."""
    import struct
    import zlib
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8                                        # signature, then length + b"IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", side, side)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def test_inputs_are_read_as_people_mean_them(server, episode, tmp_path):
    """EXIF orientation, masks in the alpha channel and 16-bit greys give the answer of the plain image;
    empty, all-ignore and bomb masks, framework errors and invented paths are refused cleanly."""
    import httpx
    from serving.client import Client
    c = Client(server.url)
    q, _ = episode[0]
    s, m = episode[1]
    img = np.array(Image.open(q).convert("RGB"))
    want = np.array(Image.open(io.BytesIO(c.segment(q, [s], [m]))))

    # a phone photo: pixels stored rotated, EXIF orientation 6 says how to show them
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _png(np.ascontiguousarray(np.rot90(img, 1)), tmp_path / "exif.png", exif=exif)
    from PIL import ImageOps
    assert np.array_equal(np.array(ImageOps.exif_transpose(Image.open(rotated))), img)
    got = np.array(Image.open(io.BytesIO(c.segment(rotated, [s], [m]))))
    assert got.shape == want.shape and np.array_equal(got, want)

    # the object only in the alpha channel of an RGBA mask
    lab = np.array(Image.open(m))
    rgba = np.zeros((*lab.shape, 4), np.uint8)
    rgba[..., 3] = np.where(lab == 1, 255, 0)
    alpha = _png(rgba, tmp_path / "alpha.png")
    plain = _png(np.where(lab == 1, 255, 0).astype(np.uint8), tmp_path / "plain.png")
    assert np.array_equal(np.array(Image.open(io.BytesIO(c.segment(q, [s], [alpha])))),
                          np.array(Image.open(io.BytesIO(c.segment(q, [s], [plain])))))

    # a 16-bit grey query is the 8-bit grey one, not white
    grey8 = np.array(Image.open(q).convert("L"))
    g8 = _png(grey8, tmp_path / "g8.png")
    g16 = tmp_path / "g16.png"
    Image.fromarray(grey8.astype(np.uint16) * 257).save(g16)
    assert Image.open(g16).mode.startswith("I")
    assert np.array_equal(np.array(Image.open(io.BytesIO(c.segment(g16, [s], [m])))),
                          np.array(Image.open(io.BytesIO(c.segment(g8, [s], [m])))))

    def post(path="/v1/segment", parts=None, **files):
        parts = parts or [(k, (Path(v).name, Path(v).read_bytes())) for k, v in files.items()]
        return httpx.post(server.url + path, files=parts, timeout=30)

    empty = _png(np.zeros(lab.shape, np.uint8), tmp_path / "empty.png")
    ignore = _png(np.full(lab.shape, 255, np.uint8), tmp_path / "ignore.png")
    bomb = _bomb_png(tmp_path / "bomb.png")
    many = [(f"f{i}", (None, "x")) for i in range(1100)]           # more parts than the parser allows
    cases = {
        "empty": (post(query=q, supports=s, masks=empty), 400, "marks no object pixel"),
        "all_ignore": (post(query=q, supports=s, masks=ignore), 400, "only the value 255"),
        "bomb_mask": (post(query=q, supports=s, masks=bomb), 413, "more pixels than the limit"),
        "bomb_query": (post(query=bomb, supports=s, masks=m), 413, "more pixels than the limit"),
        "parts": (post(parts=many), 400, ""),
        "name": (httpx.put(server.url + "/v1/support-sets/" + "x" * 80, timeout=30), 400, "1 to 64"),
        "odd_name": (httpx.put(server.url + "/v1/support-sets/a%20b", timeout=30), 400, "not allowed"),
    }
    for name, (r, status, text) in cases.items():
        assert r.status_code == status, (name, r.status_code, r.text)
        assert set(r.json()) == {"error"} and text in r.json()["error"], (name, r.json())
    c.register("mine", [s], [m])
    r = post("/v1/support-sets/other/segment", query=q)
    assert r.status_code == 404 and "mine" not in r.text            # no list of the others' names

    for i in range(40):
        assert httpx.get(f"{server.url}/no/such/path/{i}").json() == {"error": "Not Found"}
    metrics = httpx.get(server.url + "/metrics").text
    assert 'endpoint="unmatched"' in metrics and "/no/such" not in metrics
    assert 'endpoint="/v1/support-sets/{name}/segment"' in metrics
    assert httpx.get(server.url + "/v1/segment").status_code == 405     # the route's template, not unmatched
    assert 'svf_requests_total{endpoint="/v1/segment",status="405"}' in httpx.get(server.url + "/metrics").text
    assert httpx.get(server.url + "/readyz").status_code == 200


@pytest.fixture(scope="module")
def keyed(model_dir, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("# three clients\nalice-0123456789abcdef\nbob-0123456789abcdef0\nclé-0123456789abcdef\n",
                    encoding="utf-8")
    s = Server(model_dir, "onnxruntime", "--api-keys", str(keys), "--max-upload-mb", "1", "--max-inflight", "1",
               "--max-pixels", "40000", "--max-request-pixels", "9000", "--cors-origins", "http://app.example",
               "--max-json-mb", "0.5")
    yield s
    s.stop()


def test_keys_hosts_and_limits_that_hold(keyed, episode, tmp_path):
    """Support sets belong to their key; a wrong Host, no key, a chunked upload over the limit, too many
    pixels in one request and requests beyond the in-flight limit are refused, each with {"error": ...}.
    A browser's CORS preflight (which never carries the key) gets the CORS answer."""
    import httpx
    from serving.client import Client, ServiceError
    for path, method in (("/v1/support-sets/cats", "PUT"), ("/v2/models/svf_fss/infer", "POST")):
        pre = httpx.options(keyed.url + path, headers={"Origin": "http://app.example",
                                                       "Access-Control-Request-Method": method,
                                                       "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.example", pre.text
    assert httpx.options(keyed.url + "/v1/support-sets/cats").status_code == 401      # not a preflight: the key
    q, _ = episode[0]
    s, m = episode[1]
    alice = Client(keyed.url, api_key="alice-0123456789abcdef")
    bob = Client(keyed.url, api_key="bob-0123456789abcdef0")
    alice.register("cats", [s], [m])
    assert alice.http.get("/v1/support-sets").json() == {"support_sets": ["cats"]}
    assert bob.http.get("/v1/support-sets").json() == {"support_sets": []}
    with pytest.raises(ServiceError, match="404"):
        bob.segment_with("cats", q)
    assert bob.http.delete("/v1/support-sets/cats").status_code == 404
    assert alice.segment_with("cats", q)[:4] == b"\x89PNG"                   # still there for its owner

    anon = httpx.post(keyed.url + "/v1/segment", files=[("query", ("q.png", q.read_bytes()))])
    wrong = httpx.get(keyed.url + "/v1/support-sets", headers={"X-API-Key": "mallory-0123456789abcdef"})
    assert anon.status_code == wrong.status_code == 401 and "API key" in anon.json()["error"]
    assert anon.headers["www-authenticate"] == "Bearer"
    assert httpx.get(keyed.url + "/healthz").status_code == 200              # probes need no key
    twice = httpx.post(keyed.url + "/v1/segment", headers={"X-API-Key": "alice-0123456789abcdef"},
                       files=[("query", open(q, "rb")), ("query", open(q, "rb")), ("supports", open(episode[1][0], "rb")),
                              ("masks", open(episode[1][1], "rb"))])
    assert twice.status_code == 400 and "2 query parts" in twice.json()["error"], twice.text
    rebound = httpx.get(keyed.url + "/readyz", headers={"Host": "evil.example"})
    assert rebound.status_code == 400 and rebound.json() == {"error": "Host header not allowed"}
    with socket.create_connection(("127.0.0.1", keyed.port)) as two:      # which Host would count? neither
        two.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n")
        assert b" 400 " in two.recv(4096).split(b"\r\n")[0]
    utf8 = httpx.get(keyed.url + "/v1/support-sets", headers={"X-API-Key": "clé-0123456789abcdef".encode()})
    assert utf8.status_code == 200, utf8.text                              # a key file's UTF-8 key, sent as UTF-8
    assert "access-control-allow-origin" not in httpx.options(
        keyed.url + "/v1/segment", headers={"Origin": "https://evil.example",
                                             "Access-Control-Request-Method": "POST"}).headers

    sent = []

    def body():                          # chunked, no Content-Length: a file part that never ends
        yield (b'--x\r\nContent-Disposition: form-data; name="query"; filename="q.png"\r\n'
               b"Content-Type: application/octet-stream\r\n\r\n")
        for _ in range(400):
            sent.append(1)
            yield b"\0" * (1 << 20)
    try:
        r = httpx.post(keyed.url + "/v1/segment", content=body(), timeout=30,
                       headers={"Authorization": "Bearer alice-0123456789abcdef",
                                "Content-Type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    except httpx.TransportError:
        pass                             # the server may close while the client still sends
    assert len(sent) < 64, f"the server read {len(sent)} MiB of a 1 MiB-limited upload"

    big = _png(np.zeros((60, 100, 3), np.uint8), tmp_path / "q6000.png")     # 6,000 + 3,600 > 9,000 in all
    r = httpx.post(keyed.url + "/v1/segment", headers={"X-API-Key": "alice-0123456789abcdef"},
                   files=[("query", ("q.png", big.read_bytes())), ("supports", ("s.png", s.read_bytes())),
                          ("masks", ("m.png", m.read_bytes()))], timeout=30)
    assert r.status_code == 413 and "in all images" in r.json()["error"], r.text

    codes, barrier = [], threading.Barrier(12)

    def client():
        with httpx.Client(base_url=keyed.url, timeout=60, headers={"X-API-Key": "bob-0123456789abcdef0"}) as c:
            barrier.wait()
            r = c.post("/v1/segment", files=[("query", ("q.png", q.read_bytes())), ("supports", ("s.png", s.read_bytes())),
                                             ("masks", ("m.png", m.read_bytes()))])
            codes.append((r.status_code, r.headers.get("retry-after"), r.json() if r.status_code != 200 else None))
    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(codes) == 12 and {c for c, _, _ in codes} <= {200, 503} and any(c == 200 for c, _, _ in codes)
    refused = [(ra, js) for c, ra, js in codes if c == 503]
    assert refused and all(ra == "1" and "retry" in js["error"] for ra, js in refused)
    assert httpx.get(keyed.url + "/readyz").status_code == 200


def test_support_sets_survive_a_restart_and_never_cross_models(model_dir, episode, tmp_path):
    """Registered sets are written atomically, reloaded at start, refused (not used) by another model,
    and capped per key in count (429) and bytes (507)."""
    from serving.client import Client, ServiceError
    q, _ = episode[0]
    s, m = episode[1]
    store = tmp_path / "sets"
    a = Server(model_dir, "onnxruntime", "--max-sets", "1", store=store)
    try:
        c = Client(a.url)
        c.register("cats", [s], [m])
        want = c.segment_with("cats", q)
        with pytest.raises(ServiceError, match="429.*limit per key"):
            c.register("dogs", [s], [m])
        c.register("cats", [s], [m])                   # replacing one's own set is not a new one
    finally:
        a.stop()
    files = sorted(p.relative_to(store).as_posix() for p in store.rglob("*"))
    assert files == ["_open", "_open/cats.npz"]        # no temporary file left
    # files that load but do not hold this model's features, and a write's leftover, are refused at start
    with np.load(store / "_open/cats.npz") as z:
        good = {k: z[k] for k in z.files}
    bad = {"f64": {"f0": good["f0"].astype(np.float64)}, "nan": {"f0": np.full_like(good["f0"], np.nan)},
           "shape": {"f0": good["f0"][:, :1]}}      # a channel count of another model
    for name, change in bad.items():
        np.savez(store / f"_open/{name}.npz", **{**good, **change})
    (store / "_open/.cats.123.0.tmp.npz").write_bytes((store / "_open/cats.npz").read_bytes())
    b = Server(model_dir, "onnxruntime", store=store)
    try:
        c = Client(b.url)
        assert c.segment_with("cats", q) == want
        for name in bad:
            with pytest.raises(ServiceError, match="404"):
                c.segment_with(name, q)
        # eight clients PUT one name at once: every answer 201, and what is served is what a restart serves
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            answers = list(ex.map(lambda i: Client(b.url).register("race", [episode[1 + i % 3][0]],
                                                                     [episode[1 + i % 3][1]]), range(8)))
        assert all(a["name"] == "race" for a in answers)
        served = c.segment_with("race", q)
        assert sorted(p.name for p in (store / "_open").iterdir() if ".tmp." in p.name) == [".cats.123.0.tmp.npz"]
    finally:
        b.stop()
    log = b.proc.stderr.read().decode()
    for why in ("f64.npz does not hold this model's features (array 0 is float64, not float32)",
                "nan.npz does not hold this model's features (array 0 is float32 with non-finite values)",
                "shape.npz does not hold this model's features", ".cats.123.0.tmp.npz is a temporary file"):
        assert why in log, why
    assert (store / "_open/.cats.123.0.tmp.npz").exists()      # named, never removed
    for name in ("f64", "nan", "shape"):
        (store / f"_open/{name}.npz").unlink()
    (store / "_open/.cats.123.0.tmp.npz").unlink()
    again = Server(model_dir, "onnxruntime", store=store)
    try:
        assert Client(again.url).segment_with("race", q) == served
    finally:
        again.stop()
    (store / "_open/race.npz").unlink()
    t = Server(model_dir, "torch", store=store)        # other backend: features of another form
    try:
        with pytest.raises(ServiceError, match="404"):
            Client(t.url).segment_with("cats", q)
    finally:
        t.stop()
    assert "encoded by another model" in t.proc.stderr.read().decode()
    assert (store / "_open/cats.npz").exists()         # refused, not deleted
    small = Server(model_dir, "onnxruntime", "--max-set-mb", "0.0001", store=tmp_path / "small")
    try:
        with pytest.raises(ServiceError, match="507"):
            Client(small.url).register("cats", [s], [m])
    finally:
        small.stop()


def test_half_sent_requests_and_surplus_connections_are_closed(model_dir):
    """A client that never finishes its headers is dropped after --header-timeout; a body that trickles
    in answers 408 after --body-timeout; connections beyond --max-connections are closed at once; the
    service answers again as soon as they are gone. Headers over 32 KiB answer 431, a request that is not
    HTTP 400, both as {"error": ...}."""
    import httpx
    srv = Server(model_dir, "onnxruntime", "--max-connections", "4", "--header-timeout", "1.5",
                 "--body-timeout", "1.5")
    try:
        trickle = socket.create_connection(("127.0.0.1", srv.port))
        trickle.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                        b"Content-Type: multipart/form-data; boundary=x\r\n\r\n--x\r\n")
        trickle.settimeout(10)
        t0 = time.time()
        answer = b""
        while b"\r\n\r\n{" not in answer and time.time() - t0 < 8:
            try:
                trickle.sendall(b"a")                                   # a byte every 0.2 s
                time.sleep(0.2)
                trickle.settimeout(0.01)
                answer += trickle.recv(4096)
            except TimeoutError:
                pass
            except OSError:                                             # closed by the server
                break
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1.5 s" in answer, answer
        assert 1.4 < time.time() - t0 < 4
        trickle.close()

        def half_sent():
            sock = socket.create_connection(("127.0.0.1", srv.port))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")     # no blank line: never complete
            sock.settimeout(10)
            return sock
        def closed(sock) -> bool:
            try:
                return sock.recv(1024) == b""
            except ConnectionResetError:                                # closed with unread data pending
                return True
        slow = [half_sent() for _ in range(4)]
        extra = half_sent()
        t0 = time.time()
        assert closed(extra) and time.time() - t0 < 1.0                 # beyond the cap: closed at once
        for s in slow:
            assert closed(s)                                            # dropped by the header timeout
        assert time.time() - t0 < 6
        assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200

        for request, status in ((b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n", 431),
                                (b"NOT HTTP\r\n\r\n", 400)):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                sock.sendall(request)
                answer = b""
                while chunk := sock.recv(65536):                        # until the server closes
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 %d" % status) and "error" in json.loads(body), answer
        assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200
    finally:
        srv.stop()


def _pbtxt_tensors(text: str, section: str) -> list:
    block = text.split(f"{section} [", 1)[1].split("\n]", 1)[0]
    names = [line.split('"')[1] for line in block.splitlines() if "name:" in line]
    dims = [[int(d) for d in line.split("[", 1)[1].split("]")[0].split(",")] for line in block.splitlines()
            if "dims:" in line]
    return [{"name": n, "datatype": "FP32", "shape": d} for n, d in zip(names, dims)]


def test_open_inference_protocol_with_tritonclient(keyed, model_dir, episode, tmp_path):
    """Triton's own HTTP client against the service: health, metadata equal to the exported Triton
    repository's, the full model and the split encoder/decoder (binary and JSON tensors) giving the
    logits of ONNX Runtime, masks equal to /v1's, errors in the protocol's {"error": ...}."""
    import shutil
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException
    from export import triton
    from export.onnx_export import SplitSession, export_onnx
    from pipeline import adapter as adapter_io
    from serving.client import Client
    from serving.inputs import mask_of, query_tensor, read_image, read_mask, support_tensors

    # the Triton repository of these very files: the service's metadata must match its config.pbtxt
    files = tmp_path / "exported"
    files.mkdir()
    for f in ("support_encoder.onnx", "query_decoder.onnx"):
        shutil.copy(model_dir / f, files / f)
    export_onnx(adapter_io.load_merged(model_dir / "merged.pt")[0], files / "model.onnx", SIZE, 18,
                exporter="torchscript")
    repo = triton.write_repository(tmp_path / "repo", files, SIZE)
    assert [d.name for d in repo] == [triton.FULL, triton.ENCODER, triton.DECODER]

    client = triton_http.InferenceServerClient(keyed.url.removeprefix("http://"))
    key = {"Authorization": "Bearer alice-0123456789abcdef"}    # copied per call: tritonclient writes into it
    assert client.is_server_live() and client.is_server_ready()       # health needs no key
    with pytest.raises(InferenceServerException, match="API key"):
        client.get_model_metadata(triton.FULL)
    for d in repo:
        meta = client.get_model_metadata(d.name, headers=dict(key))
        config = (d / "config.pbtxt").read_text()
        assert meta["inputs"] == _pbtxt_tensors(config, "input") and meta["outputs"] == _pbtxt_tensors(config, "output")
        assert client.is_model_ready(d.name, headers=dict(key))
    assert [o["name"] for o in client.get_model_metadata(triton.ENCODER, headers=dict(key))["outputs"]] == \
        ["prototype", "support_feat4"]

    s, m = episode[1]
    img = read_image(s.read_bytes(), "s", 1 << 24)
    support, support_mask = support_tensors([img], [read_mask(m.read_bytes(), "m", img.shape[:2], 1 << 24)], SIZE)
    qimg = read_image(episode[0][0].read_bytes(), "q", 1 << 24)
    query, valid = query_tensor(qimg, SIZE)
    want = SplitSession(model_dir / "support_encoder.onnx", model_dir / "query_decoder.onnx").run(
        None, {"query": query, "support": support, "support_mask": support_mask})[0]

    def tensors(binary: bool, **arrays):
        out = []
        for name, a in arrays.items():
            t = triton_http.InferInput(name, list(a.shape), "FP32")
            t.set_data_from_numpy(a, binary_data=binary)
            out.append(t)
        return out

    for binary in (True, False):
        r = client.infer(triton.FULL, tensors(binary, query=query, support=support, support_mask=support_mask),
                         outputs=[triton_http.InferRequestedOutput("logits", binary_data=binary)], headers=dict(key))
        np.testing.assert_allclose(r.as_numpy("logits"), want, rtol=0, atol=1e-5)
    enc = client.infer(triton.ENCODER, tensors(True, support=support, support_mask=support_mask), headers=dict(key))
    feats = {f: enc.as_numpy(f) for f in ("prototype", "support_feat4")}
    two = np.concatenate([query, query])                         # the cached features serve a batch of queries
    dec = client.infer(triton.DECODER, tensors(True, query=two, **{k: np.concatenate([v, v]) for k, v in feats.items()}),
                       headers=dict(key))
    logits = dec.as_numpy("logits")
    assert logits.shape == (2, 2, SIZE, SIZE)
    np.testing.assert_allclose(logits[1], want[0], rtol=0, atol=1e-5)
    v1 = np.array(Image.open(io.BytesIO(Client(keyed.url, api_key="alice-0123456789abcdef").segment(
        episode[0][0], [s], [m])))) // 255
    assert np.array_equal(mask_of(logits[0], valid, qimg.shape[:2]), v1)

    bad = [(triton.FULL, tensors(True, query=query, support=support), "needs input\\(s\\) support_mask"),
           (triton.FULL, tensors(True, query=query[:, :, :10], support=support, support_mask=support_mask),
            "input query has shape \\[1, 3, 10, 48\\]"),
           ("nope", tensors(True, query=query), "unknown model 'nope'"),
           (triton.DECODER, tensors(True, query=two, **feats), "disagree on the batch size")]
    for name, inputs, message in bad:
        with pytest.raises(InferenceServerException, match=message):
            client.infer(name, inputs, headers=dict(key))
    # support_mask follows /v1's rules: 0/255 is read as 0/1; other values, NaN or no object pixel are refused
    r = client.infer(triton.FULL, tensors(True, query=query, support=support, support_mask=support_mask * 255),
                     headers=dict(key))
    np.testing.assert_allclose(r.as_numpy("logits"), want, rtol=0, atol=1e-5)
    for m, message in ((support_mask * 2, r"support_mask\[0\]\[0\] is not binary: it holds values \[2.0\]"),
                       (support_mask * 0.5, r"values \[0.5\]"),
                       (np.zeros_like(support_mask), r"support_mask\[0\]\[0\] marks no object pixel"),
                       (np.where(support_mask > 0, np.nan, 0).astype(np.float32), r"values \[nan\]")):
        with pytest.raises(InferenceServerException, match=message):
            client.infer(triton.FULL, tensors(True, query=query, support=support, support_mask=m), headers=dict(key))
    wrong = triton_http.InferInput("query", list(query.shape), "FP64")
    wrong.set_data_from_numpy(query.astype(np.float64))
    with pytest.raises(InferenceServerException, match="every tensor of this model is FP32"):
        client.infer(triton.DECODER, [wrong, *tensors(True, **feats)], headers=dict(key))
    import httpx
    r = httpx.post(keyed.url + f"/v2/models/{triton.FULL}/infer", content=b"{not json", headers=dict(key))
    assert r.status_code == 400 and "not JSON" in r.json()["error"]

    # malformed requests: each a 400 {"error"} naming what is wrong, checked before inference runs
    def as_json(a, name):
        return {"name": name, "shape": list(a.shape), "datatype": "FP32", "data": a.ravel().tolist()}
    inputs = [as_json(query, "query"), as_json(support, "support"), as_json(support_mask, "support_mask")]
    raw = query.tobytes()
    binary_query = {"name": "query", "shape": list(query.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": float(len(raw))}}
    cases = [
        ({"inputs": inputs}, {"Inference-Header-Content-Length": "\u00b2".encode()}, "byte count"),
        ({"inputs": [binary_query, *inputs[1:]]}, "binary", "binary_data_size must be a byte count"),
        ({"inputs": [{**inputs[0], "shape": [2 ** 32, 2 ** 32, 2 ** 32], "data": []}, *inputs[1:]]}, None, "more than"),
        ({"inputs": [{**inputs[0], "shape": [True, 3, SIZE, SIZE]}, *inputs[1:]]}, None, "positive integers"),
        ({"inputs": [{**inputs[0], "name": ["query"]}, *inputs[1:]]}, None, "has no input"),
        ({"inputs": inputs, "parameters": ["binary_data_output"]}, None, '"parameters" must be an object'),
        ({"inputs": [{**inputs[0], "parameters": "x"}, *inputs[1:]]}, None, '"parameters" must be an object'),
        ({"inputs": inputs, "outputs": [{"name": ["logits"]}]}, None, 'object with a "name"'),
        ({"inputs": inputs, "outputs": {"name": "logits"}}, None, '"outputs" must be a list'),
        ({"inputs": inputs, "outputs": [{}]}, None, 'object with a "name"'),
        ({"inputs": inputs, "outputs": [{"name": "logits", "parameters": "x"}]}, None, '"parameters" must be an object'),
        ({"inputs": inputs, "parameters": {"binary_data_output": "false"}}, None, "must be true or false"),
    ]
    for body, headers, message in cases:
        content = json.dumps(body).encode()
        if headers == "binary":
            headers, content = {"Inference-Header-Content-Length": str(len(content))}, content + raw
        r = httpx.post(keyed.url + f"/v2/models/{triton.FULL}/infer", content=content, headers={**key, **(headers or {})})
        assert r.status_code == 400 and message in r.json()["error"], (message, r.status_code, r.text[:300])
    # JSON beyond --max-json-mb (parsed or written holding the interpreter, it stalls the service) is refused
    # before any work, naming the binary extension; the same tensors in binary pass
    big = {"inputs": [as_json(np.concatenate([query] * 3), "query"), as_json(np.concatenate([support] * 3), "support"),
                      as_json(np.concatenate([support_mask] * 3), "support_mask")]}     # 0.84 MB of JSON
    r = httpx.post(keyed.url + f"/v2/models/{triton.FULL}/infer", content=json.dumps(big).encode(), headers=dict(key))
    assert r.status_code == 413 and "send the tensors in binary" in r.json()["error"], r.text[:300]
    eight = [np.concatenate([a] * 15) for a in (query, support, support_mask)]     # 69,120 logits > 0.5 MB / 8
    with pytest.raises(InferenceServerException, match="ask for them in binary"):
        client.infer(triton.FULL, tensors(True, query=eight[0], support=eight[1], support_mask=eight[2]),
                     outputs=[triton_http.InferRequestedOutput("logits", binary_data=False)], headers=dict(key))
    r = client.infer(triton.FULL, tensors(True, query=eight[0], support=eight[1], support_mask=eight[2]),
                     outputs=[triton_http.InferRequestedOutput("logits", binary_data=True)], headers=dict(key))
    assert r.as_numpy("logits").shape == (15, 2, SIZE, SIZE)
    # a NaN query gives NaN logits: the JSON answer stays JSON (null for them, counted)
    nan_q = np.full_like(query, np.nan)
    content, headers = json.dumps({"inputs": [{"name": "query", "shape": list(query.shape), "datatype": "FP32",
                                                "parameters": {"binary_data_size": nan_q.nbytes}}, *inputs[1:]]}).encode(), {}
    r = httpx.post(keyed.url + f"/v2/models/{triton.FULL}/infer", content=content + nan_q.tobytes(),
                   headers={**key, "Inference-Header-Content-Length": str(len(content))})
    answer = json.loads(r.text, parse_constant=lambda c: pytest.fail(f"bare {c} in the JSON answer"))
    out = answer["outputs"][0]
    assert r.status_code == 200 and out["parameters"]["non_finite"] == out["data"].count(None) > 0
    deep = b"[" * 100_000 + b"]" * 100_000
    r = httpx.post(keyed.url + f"/v2/models/{triton.FULL}/infer", content=deep, headers=dict(key))
    assert r.status_code == 400 and "nested too deep" in r.json()["error"], r.text[:300]


def test_an_unhandled_error_answers_500_json_and_is_counted():
    import asyncio
    import httpx
    from serving.app import Measured
    seen = []

    async def broken(scope, receive, send):
        raise RuntimeError("boom")

    async def get():
        transport = httpx.ASGITransport(app=Measured(broken, lambda scope, status, s: seen.append(status)))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get("/anything")
    r = asyncio.run(get())
    assert r.status_code == 500 and r.json() == {"error": "internal error"} and seen == [500]


def test_predict_names_why_it_skips_a_query_file(tmp_path, caplog):
    """A folder of queries: a text file is not an image; a link to nothing and a link loop are named as such."""
    from serving.predict import list_queries
    d = tmp_path / "q"
    d.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "a.png")
    (d / "notes.txt").write_text("x")
    (d / "gone.png").symlink_to(tmp_path / "nothing.png")
    (d / "loop.jpg").symlink_to(d / "loop.jpg")
    assert [f.name for f in list_queries([str(d)])] == ["a.png"]
    assert "1 file(s) that are not .jpg/.jpeg/.png: notes.txt" in caplog.text
    assert "2 image name(s) that lead to no file (a link to nothing, a link loop, a folder): gone.png, loop.jpg" in caplog.text


def test_predict_scores_against_your_labels(model_dir, episode, tmp_path, capsys):
    """`serving.predict --gt`: the class's IoU and FB-IoU pooled as the benchmarks pool episodes, each query's IoU
    (worst first), the figure; a query without its true mask, or one of another size, is named and nothing is written."""
    from serving.predict import main
    s, m = episode[1]
    queries = [episode[i][0] for i in (0, 2, 3)]
    gt = tmp_path / "gt"
    gt.mkdir()
    for i in (0, 2, 3):
        (gt / f"img{i}.png").write_bytes(episode[i][1].read_bytes())
    out = tmp_path / "out"
    main(["--model-dir", str(model_dir), "--backend", "onnxruntime", "--support", str(s), "--mask", str(m),
          "--query", *map(str, queries), "--out", str(out), "--gt", str(gt)])
    val = json.loads((out / "val.json").read_text())
    inter = union = 0
    for r in val["per_query"]:                                # recomputed from the written masks
        pred = np.array(Image.open(out / r["query"])) // 255
        truth = np.array(Image.open(gt / r["query"]))
        ok = truth != 255
        i, u = int((pred[ok] & (truth[ok] == 1)).sum()), int((pred[ok] | (truth[ok] == 1)).sum())
        assert (r["intersection"], r["union"]) == (i, u)
        inter, union = inter + i, union + u
    assert val["iou"] == round(100 * inter / union, 2) and val["queries"] == 3
    assert [r["iou"] for r in val["per_query"]] == sorted(r["iou"] for r in val["per_query"])
    assert (out / "val.png").stat().st_size > 5_000 and f"val: IoU {val['iou']:.2f}" in capsys.readouterr().out
    (gt / "img3.png").unlink()
    with pytest.raises(SystemExit, match="no mask for 1 query: img3.png"):
        main(["--model-dir", str(model_dir), "--support", str(s), "--mask", str(m), "--query", *map(str, queries),
              "--out", str(tmp_path / "out2"), "--gt", str(gt)])
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(gt / "img3.png")
    with pytest.raises(SystemExit, match="the true mask of img3.png .* is 10x10 but its image is 60x60"):
        main(["--model-dir", str(model_dir), "--backend", "onnxruntime", "--support", str(s), "--mask", str(m),
              "--query", *map(str, queries), "--out", str(tmp_path / "out2"), "--gt", str(gt)])
    assert not (tmp_path / "out2").exists()


def _class_probabilities(model_dir, query: Path, classes) -> np.ndarray:
    """[N, H, W] each class's foreground probability (softmax of its two logits at the query's resolution), in
    process: the label map's definition written out plainly."""
    import torch.nn.functional as F
    from pipeline import adapter as adapter_io
    from pipeline.data.episodes import eval_transform
    model, _ = adapter_io.load_merged(model_dir / "merged.pt")

    def tensor(p):
        return torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)
    q = tensor(query)
    h, w = q.shape[1:]
    xq, _, valid = eval_transform(q, torch.zeros(h, w, dtype=torch.uint8), SIZE)
    probs = []
    for supports, masks in classes:
        xs, ms = zip(*((x, (mm == 1).float()) for x, mm, _ in (
            eval_transform(tensor(s), torch.from_numpy(np.array(Image.open(m))), SIZE) for s, m in zip(supports, masks))))
        with torch.no_grad():
            logits = model(xq[None], torch.stack(xs)[None], torch.stack(ms)[None])[0, :, :valid[0], :valid[1]]
        up = F.interpolate(logits[None], size=(h, w), mode="bilinear", align_corners=True)[0]
        probs.append(up.softmax(0)[1].numpy())
    return np.stack(probs)


def test_many_classes_in_one_call_give_one_label_map(server, model_dir, episode, tmp_path):
    """/v1/label-map: registered sets and inline classes together; each pixel the most probable class above the
    background threshold; one class at 0.5 is exactly /v1/segment's mask; bad class lists are 4xx, nothing stored."""
    from pycocotools import mask as mask_utils
    from serving.client import Client, ServiceError
    c = Client(server.url)
    q = episode[0][0]
    a, b = ([episode[1][0]], [episode[1][1]]), ([episode[2][0], episode[3][0]], [episode[2][1], episode[3][1]])
    c.register("lm-a", *a)
    png = Image.open(io.BytesIO(c.label_map(q, sets=["lm-a"], classes={"b": b})))
    assert png.mode == "P" and png.getpalette()[3:6] == [0, 200, 255]
    got = np.array(png)
    p = _class_probabilities(model_dir, q, [a, b])
    want = np.where(p.max(0) > 0.5, p.argmax(0) + 1, 0)
    close = np.abs(p - 0.5).min(0) < 1e-4                 # a float32 rounding away from a tie: either answer
    assert got.shape == (60, 60) and np.array_equal(got[~close], want[~close]) and close.mean() < 0.01
    assert set(np.unique(got)) <= {0, 1, 2}
    js = c.label_map(q, sets=["lm-a"], classes={"b": b}, fmt="json", background_threshold=0.8)
    assert [(k["id"], k["name"]) for k in js["classes"]] == [(1, "lm-a"), (2, "b")]
    strict = np.zeros((60, 60), np.uint8)
    for k in js["classes"]:
        m = mask_utils.decode({"size": k["rle"]["size"], "counts": k["rle"]["counts"].encode()})
        assert k["area"] == m.sum() and not (strict & m).any()
        strict[m == 1] = k["id"]
    assert np.array_equal(strict[~close], np.where(p.max(0) > 0.8, p.argmax(0) + 1, 0)[~close])
    # one class at 0.5: the single-class mask exactly
    one = np.array(Image.open(io.BytesIO(c.label_map(q, sets=["lm-a"]))))
    assert np.array_equal(one, np.array(Image.open(io.BytesIO(c.segment_with("lm-a", q)))) // 255)
    over = np.array(Image.open(io.BytesIO(c.label_map(q, sets=["lm-a"], classes={"b": b}, fmt="overlay"))))
    assert over.shape == (60, 60, 3)
    for kw, status, msg in (
            (dict(sets=["lm-a"], classes={"lm-a": b}), 400, "two classes are named 'lm-a'"),
            (dict(sets=["lm-a", "nope"]), 404, "no support set named 'nope'"),
            (dict(), 400, "no class given"),
            (dict(sets=["lm-a"], background_threshold=1.5), 422, "background_threshold"),
            (dict(classes={"b": ([episode[2][0]], [])}), 400, "1 inline support image.s. but 0 mask")):
        with pytest.raises(ServiceError, match=f"HTTP {status}: .*{msg}"):
            c.label_map(q, **kw)
    with pytest.raises(ServiceError, match="HTTP 400: class 'b': mask 1 .* is 10x10 but its image is 60x60"):
        c.label_map(q, classes={"b": ([episode[2][0]], [_png(np.ones((10, 10), np.uint8), tmp_path / "m.png")])})
    assert c.ready()["status"] == "ready"


def test_label_maps_count_in_the_pixel_budget_and_class_names_are_bounded(keyed, server, episode):
    """Issue 35, item 6 and minor: a label map is one full-resolution plane per class, so its classes count in the
    request's pixel budget (the keyed server's 9,000: a 60x60 query with one class fits, with two it does not); a
    class name over 100 characters, or one equal to another up to case, spaces or Unicode form, is refused."""
    from serving.client import Client, ServiceError
    q, _ = episode[0]
    alice = Client(keyed.url, api_key="alice-0123456789abcdef")
    for name, i in (("lm-one", 1), ("lm-two", 2)):
        alice.register(name, [episode[i][0]], [episode[i][1]])
    assert np.array(Image.open(io.BytesIO(alice.label_map(q, sets=["lm-one"])))).shape == (60, 60)
    with pytest.raises(ServiceError, match=r"HTTP 413: .* brings the request to more than 9000 pixels"):
        alice.label_map(q, sets=["lm-one", "lm-two"])         # 2 planes of 3,600 and the query's 3,600
    c = Client(server.url)
    b = ([episode[2][0]], [episode[2][1]])
    for classes, msg in (({"x" * 101: b}, "a class name of 101 characters"),
                         ({"Cat": b, " cat ": b}, "'Cat' and ' cat ' .the same up to case"),
                         ({"ﬁsh": b, "fish": b}, "the same up to case, spaces or Unicode form")):
        with pytest.raises(ServiceError, match=f"HTTP 400: .*{msg}"):
            c.label_map(q, classes=classes)


def test_predict_many_classes_and_scores_each(model_dir, episode, tmp_path, capsys):
    """`serving.predict --class A ... --class B ...`: label maps, classes.json, and with --gt label maps of the same
    ids: each class's IoU pooled over the queries, their mean, recomputed here from the written maps."""
    from serving.predict import main
    gt = tmp_path / "gt"
    gt.mkdir()
    truth_of = {}
    for i in (0, 2, 3):
        img, lab = generate_image(i, "val", 60, 7)
        ca = int(next(c for c in np.unique(generate_image(1, "val", 60, 7)[1]) if c not in (0, 255)))
        cb = int(next(c for c in np.unique(generate_image(2, "val", 60, 7)[1]) if c not in (0, 255)))
        t = np.where(lab == ca, 1, np.where(lab == cb, 2, 0)).astype(np.uint8)
        t[lab == 255] = 255
        Image.fromarray(t).save(gt / f"img{i}.png")
        truth_of[f"img{i}.png"] = t
    out = tmp_path / "out"
    main(["--model-dir", str(model_dir), "--backend", "onnxruntime", "--class", "A", "--support", str(episode[1][0]),
          "--mask", str(episode[1][1]), "--class", "B", "--support", str(episode[2][0]), "--mask", str(episode[2][1]),
          "--query", *(str(episode[i][0]) for i in (0, 2, 3)), "--out", str(out), "--gt", str(gt)])
    assert json.loads((out / "classes.json").read_text())["classes"][1]["name"] == "B"
    val = json.loads((out / "val.json").read_text())
    inter, union = np.zeros(2), np.zeros(2)
    for name, t in truth_of.items():
        pred = np.array(Image.open(out / name))
        ok = t != 255
        for k in (1, 2):
            inter[k - 1] += ((pred == k) & (t == k))[ok].sum()
            union[k - 1] += ((pred == k) | (t == k))[ok].sum()
    per = [round(100 * i / u, 2) if u else 100.0 for i, u in zip(inter, union)]
    assert list(val["per_class"].values()) == per and val["miou"] == round(sum(100 * i / u if u else 100.0 for i, u
                                                                              in zip(inter, union)) / 2, 2)
    assert "val: mIoU" in capsys.readouterr().out
    Image.fromarray(np.full((60, 60), 3, np.uint8)).save(gt / "img3.png")
    with pytest.raises(SystemExit, match=r"holds the value\(s\) \[3\]"):
        main(["--model-dir", str(model_dir), "--backend", "onnxruntime", "--class", "A", "--support",
              str(episode[1][0]), "--mask", str(episode[1][1]), "--class", "B", "--support", str(episode[2][0]),
              "--mask", str(episode[2][1]), "--query", str(episode[3][0]), "--out", str(tmp_path / "o2"), "--gt", str(gt)])
    with pytest.raises(SystemExit, match="every --support follows a --class"):
        main(["--model-dir", str(model_dir), "--support", str(episode[1][0]), "--mask", str(episode[1][1]),
              "--class", "A", "--support", str(episode[2][0]), "--mask", str(episode[2][1]),
              "--query", str(episode[3][0]), "--out", str(tmp_path / "o3")])
    with pytest.raises(SystemExit):
        main(["--model-dir", str(model_dir), "--class", "A", "--support", str(episode[1][0]), "--mask",
              str(episode[1][1]), "--class", "A", "--support", str(episode[2][0]), "--mask", str(episode[2][1]),
              "--query", str(episode[3][0]), "--out", str(tmp_path / "o3")])
    assert "two classes are named 'A'" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_the_registered_pyfunc_serves_masks_with_mlflow_models_serve(model_dir, episode, tmp_path):
    """`mlflow models serve -m models:/<name>@<alias> --env-manager local`: base64 images and masks in (or a support
    set the service registered), the masks of the in-process model out; a bad row is a 400 that names it."""
    import base64
    import httpx
    import mlflow
    from serving.backends import OnnxBackend
    from serving.inputs import read_image, read_mask, support_tensors
    from serving.mlflow_model import log_pyfunc
    from serving.store import SupportStore, feature_shapes, fingerprint
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("pyfunc")
    t0 = time.perf_counter()
    with mlflow.start_run():
        info = log_pyfunc(model_dir, "fss-test", ["mlflow"], SIZE)
    print(f"logged in {time.perf_counter() - t0:.1f} s")
    mlflow.MlflowClient().set_registered_model_alias("fss-test", "fold0-1shot", info.registered_model_version)
    # a support set registered by the service (same ONNX graphs, so the same fingerprint)
    b = OnnxBackend(model_dir)
    store = tmp_path / "sets"
    (s1, m1), (s2, m2) = episode[1], episode[2]
    img = read_image(s1.read_bytes(), "s", 1 << 24)
    feats = b.encode(*support_tensors([img], [read_mask(m1.read_bytes(), "m", img.shape[:2], 1 << 24)], b.size))
    SupportStore(store, fingerprint(b.kind, b.files), feature_shapes=feature_shapes(b)).put("", "cls", feats, {})
    port = _free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, SVF_FSS_STORE=str(store), OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")   # its uvicorn
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                             "models:/fss-test@fold0-1shot", "--env-manager", "local", "-h", "127.0.0.1", "-p",
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/ping", proc, "mlflow models serve", 120)
        print(f"served after {time.perf_counter() - t0:.1f} s")

        def b64(p):
            return base64.b64encode(Path(p).read_bytes()).decode()
        q = episode[0][0]
        t = time.perf_counter()
        rows = []
        for record in ({"query": b64(q), "supports": [b64(s1), b64(s2)], "masks": [b64(m1), b64(m2)]},
                       {"query": b64(q), "support_set": "cls"}):
            r = httpx.post(url + "/invocations", json={"dataframe_records": [record]}, timeout=60)
            assert r.status_code == 200, r.text
            rows += r.json()["predictions"]
        took = (time.perf_counter() - t) / 2
        for row, (sup, msk) in zip(rows, (([s1, s2], [m1, m2]), ([s1], [m1]))):
            mask = np.array(Image.open(io.BytesIO(base64.b64decode(row["mask"]))))
            want = expected_mask(model_dir, q, sup, msk)
            assert np.array_equal(mask // 255, want) and row["area"] == want.sum() and (row["height"], row["width"]) == (60, 60)
        for record, msg in (({"query": "not base64!", "support_set": "cls"}, "row 0 query is not valid base64"),
                            ({"query": b64(q), "support_set": "nope"}, "row 0: no support set named 'nope'"),
                            ({"query": b64(q), "supports": [b64(s1)], "masks": []}, "1 support image.s. and 0 mask"),
                            ({"query": b64(q), "supports": [b64(s1)], "masks": [b64(q)]}, "row 0 mask 1")):
            r = httpx.post(url + "/invocations", json={"dataframe_records": [record]}, timeout=60)
            assert r.status_code == 400 and re.search(msg, r.json()["message"]), r.text
        print(f"mlflow models serve: {took:.2f} s a request")
    finally:
        proc.terminate()
        proc.wait(20)


def _chromium():
    import shutil
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="the browser test needs Chromium (Debian: apt install chromium)")
def test_the_page_segments_in_a_real_browser(server, model_dir, episode, tmp_path):
    """/ui in Chromium (Playwright): paint and undo, an empty mask refused, masks uploaded, two classes, two queries at
    once; the downloaded label map equals the service's answer for the same files, the JSON decodes to it; a photo
    over the pixel limit and two classes of one name are refused on the page; no request leaves the origin."""
    from playwright.sync_api import expect, sync_playwright
    from pycocotools import mask as mask_utils
    from serving.client import Client
    big = _png(np.zeros((300, 300, 3), np.uint8), tmp_path / "photo.png")        # over the server's 40,000 pixels
    shots = os.environ.get("SVF_FSS_SCREENSHOTS")
    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(accept_downloads=True, viewport={"width": 1280, "height": 820})
        page.on("request", lambda r: requests.append(r.url))
        page.goto(server.url + "/ui")
        msg = page.locator("#message")
        first = page.locator(".class").nth(0)
        first.locator(".support-files").set_input_files(str(episode[1][0]))
        canvas = first.locator("canvas.paint").first
        box = canvas.bounding_box()
        page.mouse.move(box["x"] + 10, box["y"] + 10)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] - 10, box["y"] + box["height"] - 10, steps=5)
        page.mouse.up()
        painted = canvas.evaluate("c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((v, i) => i % 4 == 3 && v).length")
        page.click("#undo")
        undone = canvas.evaluate("c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((v, i) => i % 4 == 3 && v).length")
        assert painted > 100 and undone == 0
        page.locator("#query-files").set_input_files([str(episode[0][0]), str(episode[3][0]), str(big)])
        expect(msg).to_contain_text("photo.png is 300x300 (90000 pixels): the service takes at most 40000 pixels")
        page.click("#segment")
        expect(msg).to_contain_text("support 1 (img1.png): its mask is empty")
        first.locator(".mask-file").set_input_files(str(episode[1][1]))
        page.click("#add-class")
        second = page.locator(".class").nth(1)
        second.locator(".name").fill("object")
        second.locator(".support-files").set_input_files(str(episode[2][0]))
        second.locator(".mask-file").set_input_files(str(episode[2][1]))
        page.click("#segment")
        expect(msg).to_contain_text('two classes are named "object"')
        second.locator(".name").fill("second")
        page.click("#segment")
        page.wait_for_selector(".result >> nth=1", timeout=30_000)
        expect(msg).to_contain_text("2 queries segmented")
        if shots:
            page.screenshot(path=f"{shots}/ui.png", full_page=True)
        result = page.locator(".result").nth(0)
        with page.expect_download() as d:
            result.locator("button.png").click()
        d.value.save_as(tmp_path / "page.png")
        with page.expect_download() as d:
            result.locator("button.json").click()
        d.value.save_as(tmp_path / "page.json")
        browser.close()
    got = np.array(Image.open(tmp_path / "page.png"))
    want = np.array(Image.open(io.BytesIO(Client(server.url).label_map(
        episode[0][0], classes={"object": ([episode[1][0]], [episode[1][1]]), "second": ([episode[2][0]], [episode[2][1]])}))))
    assert got.shape == (60, 60) and np.array_equal(got, want) and (got > 0).any()
    js = json.loads((tmp_path / "page.json").read_text())
    assert js["file"] == "img0.png" and [c["name"] for c in js["classes"]] == ["object", "second"]
    for c in js["classes"]:
        assert np.array_equal(mask_utils.decode({"size": c["rle"]["size"], "counts": c["rle"]["counts"].encode()}),
                              (got == c["id"]).astype(np.uint8))
    outside = [u for u in requests if not u.startswith((server.url + "/", "blob:", "data:"))]
    assert not outside and any(u.endswith("/v1/label-map") for u in requests), outside


def _wait_http(url: str, proc, what: str, seconds: float = 90, headers=None):
    import httpx
    deadline = time.time() + seconds
    while True:
        assert proc.poll() is None, f"{what} exited: " + (proc.stderr.read().decode()[-3000:] if proc.stderr else "")
        try:
            if httpx.get(url, timeout=1, headers=headers).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, f"{what} did not answer {url}"
        time.sleep(0.25)


def test_openvino_reads_the_same_graphs_and_auto_times_it_against_onnxruntime(model_dir, caplog):
    """OpenVINO (FP32) over the split graphs answers as ONNX Runtime does; `auto` on a CPU decodes a query with
    both and keeps the faster, saying so."""
    import logging

    from serving.backends import OnnxBackend, OpenVINOBackend, load_backend
    ov, ort = OpenVINOBackend(model_dir), OnnxBackend(model_dir)
    assert ov.features == ort.features and ov.size == ort.size and ov.kind != ort.kind
    rng = np.random.default_rng(0)
    s = rng.standard_normal((1, 2, 3, ov.size, ov.size)).astype(np.float32)
    m = (rng.random((1, 2, ov.size, ov.size)) > 0.5).astype(np.float32)
    q = rng.standard_normal((3, 3, ov.size, ov.size)).astype(np.float32)
    a, b = ov.decode(q, ov.encode(s, m)), ort.decode(q, ort.encode(s, m))
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4
    with caplog.at_level(logging.INFO, logger="serving.backends"):
        chosen = load_backend(model_dir, "auto")
    line = next(r.message for r in caplog.records if r.message.startswith("backend auto on the CPU"))
    assert "openvino" in line and "onnxruntime" in line and chosen.kind in ("openvino", "onnxruntime")
