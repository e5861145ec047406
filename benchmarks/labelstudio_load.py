"""How long the Label Studio backend's /health takes to answer while hostile requests run (issue 35, items 5
and 7), on a tiny exported model (the work measured is the backend's, not the model's):

  5a  a 55 kB brush RLE that declares 2^30 values
  5b  a literal-only brush RLE for a 768x768 image (2.4 million one-word chunks)
  7a  a labelling config of 20,000 labels (/predict)
  7b  a 48 MB task image (uncompressed PNG)

    .venv/bin/python benchmarks/labelstudio_load.py [--root CHECKOUT] [--model-dir DIR]

``--root`` runs the backend of another checkout (an earlier commit: the "before"). Prints one line per load:
the request's status and time, and the slowest /health answer while it ran (polled every 20 ms).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
          '<Label value="A"/></BrushLabels></View>')


def stream(n: int, chunks: str) -> list[int]:
    bits = format(n, "032b") + "00111" + "0010" + "0011" + "0111" + "1111" + chunks
    bits += "0" * (-len(bits) % 8)
    return list(int(bits, 2).to_bytes(len(bits) // 8, "big"))


def region(w: int, h: int, rle: list[int]) -> dict:
    return {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": w, "original_height": h,
            "value": {"format": "rle", "rle": rle, "brushlabels": ["A"]}}


def event(url: str, reg: dict, ann: int) -> dict:
    return {"action": "ANNOTATION_CREATED", "project": {"id": 1, "label_config": CONFIG},
            "annotation": {"id": ann, "result": [reg]}, "task": {"id": 1, "data": {"image": url}}}


def tiny_model(d: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from conftest import small_merged_model
    from export.onnx_export import export_split
    from pipeline import adapter as adapter_io
    merged, cfg = small_merged_model("resnet18", 48)
    adapter_io.save(adapter_io.merged_state(merged, cfg), d / "merged.pt")
    export_split(merged, d, 48, 18, {"input_size": [48, 48]}, "torchscript")
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(ROOT), help="the checkout whose backend runs")
    ap.add_argument("--model-dir", default=None, help="an exported model (default: a tiny one made here)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ls-load-"))
    model = Path(args.model_dir) if args.model_dir else tiny_model(work)
    web = work / "web"
    web.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 60, 3), dtype=np.uint8)).save(web / "small.png")
    Image.fromarray(rng.integers(0, 255, (768, 768, 3), dtype=np.uint8)).save(web / "mid.png")
    Image.fromarray(rng.integers(0, 255, (4000, 4000, 3), dtype=np.uint8)).save(web / "big.png", compress_level=0)
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass
    files = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(web)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    site = f"http://127.0.0.1:{files.server_address[1]}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    help_text = subprocess.run([sys.executable, "-m", "serving.labelstudio", "--help"], cwd=args.root,
                               capture_output=True, text=True).stdout
    extra = ["--allow-image-host", site.split("//")[1]] if "--allow-image-host" in help_text else []
    proc = subprocess.Popen([sys.executable, "-m", "serving.labelstudio", "--model-dir", str(model), "--backend",
                             "onnxruntime", "--port", str(port), "--store", str(work / "store"), "--shots", "1", *extra],
                            cwd=args.root, env=dict(os.environ, PYTHONPATH=args.root), stdout=subprocess.DEVNULL,
                            stderr=open(work / "backend.log", "w"))
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    n = 768 * 768 * 4
    loads = {
        "5a RLE declaring 2^30 values": ("/webhook", event(site + "/small.png", region(60, 60, stream(2 ** 30, "")
                                                                                      + [0] * 55_000), 1)),
        "5b literal-only RLE, 768x768": ("/webhook", event(site + "/mid.png", region(768, 768, stream(
            n, ("000000" + "0" * 8 + "000000" + "1" * 8) * (n // 2))), 2)),
        "7a config of 20,000 labels": ("/predict", {"project": 1, "tasks": [], "label_config": CONFIG.replace(
            '<Label value="A"/>', "".join(f'<Label value="L{i}"/>' for i in range(20_000)))}),
        "7b a 48 MB task image": ("/webhook", event(site + "/big.png", region(60, 60, stream(14400, "111" + format(14399, "016b")
                                                                                     + "1" * 8)), 3)),
    }
    print(f"backend: {args.root}  (image of 7b: {(web / 'big.png').stat().st_size / 1e6:.1f} MB)")
    try:
        for name, (path, body) in loads.items():
            data = json.dumps(body).encode()
            stop, times = threading.Event(), []

            def poll():
                while not stop.is_set():
                    t = time.perf_counter()
                    try:
                        httpx.get(url + "/health", timeout=60)
                    except httpx.HTTPError:
                        pass
                    times.append(time.perf_counter() - t)
                    time.sleep(0.02)
            th = threading.Thread(target=poll)
            th.start()
            t = time.perf_counter()
            try:
                r = httpx.post(url + path, content=data, headers={"content-type": "application/json"}, timeout=300)
                status = r.status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            took = time.perf_counter() - t
            stop.set()
            th.join()
            print(f"{name:32s} {len(data) / 1e6:6.1f} MB  -> {status}  in {took:6.2f} s; /health at most "
                  f"{max(times) * 1000:7.0f} ms", flush=True)
    finally:
        proc.terminate()
        proc.wait(15)
        files.shutdown()


if __name__ == "__main__":
    main()
