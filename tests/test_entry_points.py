"""The entry points beside the service hold its rules: the MLflow pyfunc (the store read per request, the
service's input limits), serving.predict (truths read as support masks, Label Studio addresses that name
their files, a --class without shots refused), and the page (every query exported, a hashed script CSP)."""
import base64
import io
import json
import threading
import urllib.parse
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_serving import _chromium, episode, model_dir, server  # noqa: F401  (module fixtures, built here once)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_the_pyfunc_reads_the_store_per_request_and_holds_the_service_limits(model_dir, episode, tmp_path,
                                                                            monkeypatch):
    """The pyfunc loaded by mlflow.pyfunc.load_model over an empty store: a set registered afterwards is served,
    a set registered again is served with its new features, a deleted one and another model's are no set; a
    mask_threshold outside (0, 1), more shots than the service takes, a row over the request's pixel budget and
    a name that leaves the store are refused naming the row."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from serving.backends import OnnxBackend
    from serving.inputs import mask_of, query_tensor, read_image, read_mask, support_tensors
    from serving.mlflow_model import log_pyfunc
    from serving.store import SupportStore, feature_shapes, fingerprint
    store = tmp_path / "sets"
    store.mkdir()
    monkeypatch.setenv("SVF_FSS_STORE", str(store))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("pyfunc-store")
    with mlflow.start_run():
        info = log_pyfunc(model_dir, None, ["mlflow"], 48)
    model = mlflow.pyfunc.load_model(info.model_uri)
    b = OnnxBackend(model_dir)                                      # the service's writer, its fingerprint
    writer = SupportStore(store, fingerprint(b.kind, b.files), feature_shapes=feature_shapes(b))
    q = _b64(episode[0][0].read_bytes())
    sup, msk = _b64(episode[1][0].read_bytes()), _b64(episode[1][1].read_bytes())
    img = read_image(episode[1][0].read_bytes(), "s", 1 << 24)
    feats = b.encode(*support_tensors([img], [read_mask(episode[1][1].read_bytes(), "m", img.shape[:2], 1 << 24)],
                                      b.size))
    x, valid = query_tensor(np.array(Image.open(episode[0][0]).convert("RGB")), b.size)

    def masks(rows, **params):
        out = model.predict(pd.DataFrame(rows), params=params or None)
        return [np.array(Image.open(io.BytesIO(base64.b64decode(m)))) // 255 for m in out["mask"]]

    def refused(rows, message, **params):
        with pytest.raises(MlflowException, match=message) as e:
            model.predict(pd.DataFrame(rows), params=params or None)
        assert e.value.error_code == "INVALID_PARAMETER_VALUE"

    # registered after the model loaded, then again with features that answer otherwise (this random model's
    # masks hardly depend on the support; scaled features move them): each time the file's features answer
    answers = []
    for f in (feats, tuple(100 * a for a in feats)):
        writer.put("", "cls", f, {})
        answers.append(masks([{"query": q, "support_set": "cls"}]) +
                       masks([{"query": q, "supports": [sup], "masks": [msk]}]))
        assert np.array_equal(answers[-1][0], mask_of(b.decode(x, f)[0], valid, (60, 60)))
    assert np.array_equal(answers[0][0], answers[0][1]) and not np.array_equal(answers[0][0], answers[1][0])
    writer.delete("", "cls")
    refused([{"query": q, "support_set": "cls"}], "row 0: no support set named 'cls'")
    SupportStore(store, "another model's fingerprint", feature_shapes=feature_shapes(b)).put("", "alien", feats, {})
    writer.put("", "kept", feats, {})
    refused([{"query": q, "support_set": "kept"}, {"query": q, "support_set": "alien"}],
            "row 1: no support set named 'alien'")
    refused([{"query": q, "support_set": "../sets/_open/alien"}], "row 0: support-set name .* is not allowed")
    refused([{"query": q, "supports": [sup], "masks": [msk]}], r"mask_threshold -1.0 is outside \(0, 1\)",
            mask_threshold=-1.0)
    refused([{"query": q, "supports": [sup] * 11, "masks": [msk] * 11}],       # the service's default max_shots: 10
            "row 0: 11 shots given; at most 10 are accepted")
    big = _b64(_png_bytes(Image.new("1", (4096, 4096), 1)))        # 5 images of 4096x4096: over 4 x 4096 x 4096
    corner = np.zeros((4096, 4096), np.uint8)
    corner[:8, :8] = 255
    refused([{"query": q, "supports": [big] * 5, "masks": [_b64(_png_bytes(Image.fromarray(corner)))] * 5}],
            "row 0 support 5 brings the request to more than 67108864 pixels in all images")


def _predict(model_dir, *args):
    from serving.predict import main
    main(["--model-dir", str(model_dir), "--backend", "onnxruntime", "--no-overlay", *map(str, args)])


def test_predict_reads_truths_as_support_masks_and_says_how(model_dir, episode, tmp_path, capsys, caplog):
    """--gt under one --class reads 0/255 truths as masks (255 object), as without --class and as support masks: the
    same IoU as their 0/1 form, the rule in val.json and printed; an all-255 truth is refused; a 0/255 truth of
    several classes is read as a label map (255 ignore) under a rule of its own, printed, with a warning; a --class
    without supports after it is refused, not ignored."""
    s, m = episode[1]
    queries = [episode[i][0] for i in (0, 2, 3)]
    gt01, gt255 = tmp_path / "gt01", tmp_path / "gt255"
    for d in (gt01, gt255):
        d.mkdir()
    for i in (0, 2, 3):
        t = (np.array(Image.open(episode[i][1])) == 1).astype(np.uint8)      # no ignore: 0/255 cannot say it
        Image.fromarray(t).save(gt01 / f"img{i}.png")
        Image.fromarray(t * 255).save(gt255 / f"img{i}.png")
    runs = {}
    for name, gt, klass in (("0/1: 255 ignore", gt01, []), ("0/255: 255 object", gt255, []),
                            ("0/255 under --class", gt255, ["--class", "A"])):
        out = tmp_path / name.replace("/", "").replace(" ", "")
        _predict(model_dir, *klass, "--support", s, "--mask", m, "--query", *queries, "--out", out, "--gt", gt)
        runs[name] = json.loads((out / "val.json").read_text()), capsys.readouterr().out
    ious = {name: [(r["query"], r["intersection"], r["union"]) for r in val["per_query"]]
            for name, (val, _) in runs.items()}
    assert len(set(map(str, ious.values()))) == 1 and any(i for _, i, _ in ious["0/1: 255 ignore"]), ious
    for name, (val, printed) in runs.items():
        rule = name.replace(" under --class", ": 255 object")
        assert val["truth"] == {rule: 3} and f"truth read as {rule} (3 queries)" in printed
        assert {r["truth"] for r in val["per_query"]} == {rule}
    Image.fromarray(np.full((60, 60), 255, np.uint8)).save(gt255 / "img3.png")
    with pytest.raises(SystemExit, match="the true mask of img3.png .* holds only the value 255"):
        _predict(model_dir, "--class", "A", "--support", s, "--mask", m, "--query", *queries, "--out",
                 tmp_path / "o1", "--gt", gt255)
    Image.fromarray((np.array(Image.open(episode[3][1])) == 1).astype(np.uint8) * 255).save(gt255 / "img3.png")
    _predict(model_dir, "--class", "A", "--support", s, "--mask", m, "--class", "B", "--support", episode[2][0],
             "--mask", episode[2][1], "--query", *queries, "--out", tmp_path / "two", "--gt", gt255)
    assert "truth read as label map of 0 and 255 only: no class pixel, 255 ignore (3 queries)" in capsys.readouterr().out
    assert "the true label map of img0.png (" in caplog.text and "holds only 0 and 255" in caplog.text
    with pytest.raises(SystemExit, match="--class 'B' has no --support after it"):
        _predict(model_dir, "--class", "A", "--support", s, "--mask", m, "--class", "B", "--query", *queries,
                 "--out", tmp_path / "o3")
    with pytest.raises(SystemExit):
        _predict(model_dir, "--class", "A", "--class", "B", "--support", s, "--mask", m, "--query", *queries,
                 "--out", tmp_path / "o3")
    assert "--class 'A' has no --support after it" in capsys.readouterr().err
    assert not any((tmp_path / o).exists() for o in ("o1", "o3"))


def test_label_studio_tasks_name_their_files_whatever_the_characters(model_dir, episode, tmp_path, monkeypatch):
    """--format labelstudio: a query named with '#', '&', '+', '%', '?', '=' or a space is its own file in the
    task's URL: the default prefix's ``d`` parameter decodes to its path, and an http prefix served by a loopback
    server fetches its bytes."""
    import httpx
    monkeypatch.chdir(tmp_path)
    names = ["a#1.png", "b&d=2.png", "c+d.png", "e%41.png", "f g?.png"]
    Path("q").mkdir()
    for i, n in enumerate(names):
        Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(Path("q") / n)
    s, m = episode[1]
    _predict(model_dir, "--support", s, "--mask", m, "--query", "q", "--out", "ls", "--format", "labelstudio")
    tasks = json.loads(Path("ls/labelstudio.json").read_text())
    paths = [urllib.parse.parse_qs(urllib.parse.urlsplit(t["data"]["image"]).query)["d"] for t in tasks]
    assert paths == [[f"q/{n}"] for n in sorted(names)]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        prefix = f"http://127.0.0.1:{httpd.server_address[1]}/"
        _predict(model_dir, "--support", s, "--mask", m, "--query", "q", "--out", "ls2", "--format", "labelstudio",
                 "--image-url", prefix)
        for t, n in zip(json.loads(Path("ls2/labelstudio.json").read_text()), sorted(names)):
            r = httpx.get(t["data"]["image"], timeout=10)
            assert r.status_code == 200 and r.content == (Path("q") / n).read_bytes(), (n, t["data"]["image"])
    finally:
        httpd.shutdown()
        httpd.server_close()


def _with_class(page, episode):
    """The page's first class given a support and its mask."""
    first = page.locator(".class").nth(0)
    first.locator(".support-files").set_input_files(str(episode[1][0]))
    first.locator(".mask-file").set_input_files(str(episode[1][1]))


@pytest.mark.skipif(_chromium() is None, reason="the browser test needs Chromium (Debian: apt install chromium)")
def test_the_page_exports_every_query_whatever_its_name(server, episode, tmp_path):
    """/ui in Chromium: four queries, two of one name and one named __proto__, are four results and four entries
    of "Download all", the repeated name made unique; each entry is the service's answer for its own file."""
    from playwright.sync_api import expect, sync_playwright
    from serving.client import Client
    files = [("a.png", episode[0][0]), ("a.png", episode[3][0]), ("__proto__", episode[2][0]), ("b.png", episode[1][0])]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(accept_downloads=True)
        page.goto(server.url + "/ui")
        _with_class(page, episode)
        page.locator("#query-files").set_input_files([{"name": n, "mimeType": "image/png", "buffer": f.read_bytes()}
                                                      for n, f in files])
        page.click("#segment")
        expect(page.locator("#message")).to_contain_text("4 queries segmented", timeout=30_000)
        assert page.locator(".result").count() == 4
        with page.expect_download() as d:
            page.click("#download-all")
        d.value.save_as(tmp_path / "masks.json")
        browser.close()
    got = json.loads((tmp_path / "masks.json").read_text())["masks"]
    assert [g["file"] for g in got] == ["a.png", "a (2).png", "__proto__", "b.png"]
    c = Client(server.url)
    for g, (_, f) in zip(got, files):
        want = c.label_map(f, classes={"object": ([episode[1][0]], [episode[1][1]])}, fmt="json")
        assert g["classes"] == want["classes"], g["file"]


def _serve(route, _request=None, *, body: str, csp: str):
    route.fulfill(status=200, body=body, headers={"Content-Type": "text/html", "Content-Security-Policy": csp})


@pytest.mark.skipif(_chromium() is None, reason="the browser test needs Chromium (Debian: apt install chromium)")
def test_the_page_runs_under_a_csp_that_allows_only_its_own_script():
    """serving/page.py: the page served with its CSP runs its script (which reads the limits from their JSON data
    block) with no inline script allowed otherwise; the same page with its script changed by one character does
    not run under that CSP."""
    from playwright.sync_api import sync_playwright
    from serving.page import page_and_csp
    url = "http://svf-fss.test/ui"                          # answered here: no server, no network
    limits = {"max_pixels": 40000, "max_shots": 3, "max_upload_bytes": 1, "input_size": 48, "palette": [[0, 0, 0]] * 33,
              "note": "</script><script>document.title = 'injected'</script>"}
    html, csp = page_and_csp(json.dumps(limits))
    script_src = next(d for d in csp.split(";") if d.strip().startswith("script-src"))
    assert "'unsafe-inline'" not in script_src and "'sha256-" in script_src
    changed = html.replace("addClass(\"object\");", "addClass(\"object!\");")
    assert changed != html
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        refusals = []
        page.on("console", lambda m: refusals.append(m.text) if "Content Security Policy" in m.text else None)
        for body in (html, changed):
            page.route(url, partial(_serve, body=body, csp=csp))
            page.goto(url)
            page.unroute(url)
            if body is html:
                assert page.locator(".class .name").input_value() == "object" and not refusals, refusals
                assert "model input 48 px, at most 3 shots a class" in page.locator("#info").text_content()
                assert page.title() != "injected"
        assert page.locator(".class").count() == 0 and any("script-src" in r for r in refusals), refusals
        browser.close()


def test_predict_writes_every_output_or_none_when_a_name_is_taken_by_a_folder(model_dir, episode, tmp_path):
    """Like svf_fss_predict: a folder where an output goes refuses the run before any earlier output is replaced."""
    from serving.inputs import UserError
    from serving.predict import predict
    (s, m), queries = episode[1], [str(episode[i][0]) for i in (0, 2, 3)]
    out = tmp_path / "out"
    predict(model_dir, [str(s)], [str(m)], queries, out, "onnxruntime", overlays=False, progress=False)
    before = {f.name: f.stat().st_ino for f in out.iterdir()}     # a replaced file is a new inode
    (out / "img2.png").unlink()
    (out / "img2.png").mkdir()
    with pytest.raises(UserError, match="img2.png is a folder"):
        predict(model_dir, [str(episode[2][0])], [str(episode[2][1])], queries, out, "onnxruntime", overlays=False,
                progress=False)
    assert {f.name: f.stat().st_ino for f in out.iterdir() if f.is_file()} == \
        {k: v for k, v in before.items() if k != "img2.png"}
