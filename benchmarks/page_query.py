"""What the page (/ui) waits for per query: the service's answer to a 500x375 JPEG against a registered set.

    .venv/bin/python benchmarks/page_query.py MODEL_DIR:BACKEND [MODEL_DIR:BACKEND ...] [--runs 5]

Each pair starts `python -m serving --model-dir MODEL_DIR --backend BACKEND` on 127.0.0.1, registers a set of one
support, and times `/v1/support-sets/<name>/segment` (HTTP, decoding, the model, the mask at the query's
resolution, PNG encoding): the median of --runs after one. Ratios are to the first pair, measured in one run. E.g.
a model folder and its preview folder (export.preview_size), with onnxruntime and openvino-int8.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", help="MODEL_DIR:BACKEND")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    from serving.client import Client
    d = Path(tempfile.mkdtemp(prefix="page-query-"))
    rng = np.random.default_rng(0)
    for name in ("q.jpg", "s.jpg"):
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(d / name)
    m = np.zeros((375, 500), np.uint8)
    m[100:250, 150:350] = 1
    Image.fromarray(m).save(d / "m.png")
    first = None
    for pair in args.pairs:
        model_dir, backend = pair.rsplit(":", 1)
        port = free_port()
        p = subprocess.Popen([sys.executable, "-m", "serving", "--model-dir", model_dir, "--backend", backend, "--port",
                              str(port), "--store", "none"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            t0 = time.time()
            while True:
                if p.poll() is not None:
                    raise SystemExit(f"{pair}: the service did not start (exit {p.returncode})")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            ready = time.time() - t0
            c = Client(f"http://127.0.0.1:{port}")
            c.register("obj", [d / "s.jpg"], [d / "m.png"])
            times = []
            for _ in range(args.runs + 1):
                t = time.perf_counter()
                c.segment_with("obj", d / "q.jpg")
                times.append(time.perf_counter() - t)
        finally:
            p.terminate()
            p.wait()
        ms = statistics.median(times[1:]) * 1000
        first = first or ms
        print(f"{pair}: ready in {ready:.1f} s; {ms:.0f} ms a query ({first / ms:.2f}x the first)", flush=True)


if __name__ == "__main__":
    main()
