"""Load on the real service over loopback: requests per second and p50/p99 latency at 1, 4 and 16
concurrent clients, for /v1/segment (supports uploaded each time) and for a registered support set.

    python benchmarks/serve_load.py [--model-dir models/fold0/1shot] [--backend auto] [--seconds 10]

Starts `python -m serving` on a free 127.0.0.1 port, drives it with threads of httpx clients for a
bounded time per level, then stops it.
"""
from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.synthetic import generate_image  # noqa: E402


def png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def episode(size: int):
    qi, _ = generate_image(0, "val", size, 11)
    si, sl = generate_image(1, "val", size, 11)
    cls = int(next(c for c in np.unique(sl) if c not in (0, 255)))
    return png(qi), png(si), png(np.where(sl == cls, 255, 0).astype(np.uint8))


def load(url: str, path: str, files, clients: int, seconds: float):
    lat, errors = [], []
    stop = time.perf_counter() + seconds

    def worker():
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = c.post(path, files=files)
                dt = time.perf_counter() - t
                (lat if r.status_code == 200 else errors).append(dt)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    pct = (lambda p: 1000 * lat[min(len(lat) - 1, int(p * len(lat)))]) if lat else (lambda p: float("nan"))
    return {"rps": len(lat) / wall, "p50": pct(0.5), "p99": pct(0.99), "ok": len(lat), "errors": len(errors)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(ROOT / "models" / "fold0" / "1shot"))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--image-size", type=int, default=128, help="side of the uploaded test images")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "serving", "--model-dir", args.model_dir, "--backend", args.backend,
                             "--port", str(port)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                ready = httpx.get(url + "/readyz", timeout=1)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                sys.exit("the service did not start")
            time.sleep(0.3)
        info = ready.json()
        q, s, m = episode(args.image_size)
        httpx.put(url + "/v1/support-sets/bench", files=[("supports", ("s.png", s)), ("masks", ("m.png", m))])
        print(f"service: backend {info['backend']}, model input {info['input_size']} px, uploads "
              f"{args.image_size}x{args.image_size} PNG, {args.seconds:g} s per level, {os.cpu_count()} CPUs")
        print(f"{'endpoint':34s} {'clients':>7s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s}")
        for name, path, files in (
                ("/v1/segment (1 shot uploaded)", "/v1/segment",
                 [("query", ("q.png", q)), ("supports", ("s.png", s)), ("masks", ("m.png", m))]),
                ("/v1/support-sets/bench/segment", "/v1/support-sets/bench/segment", [("query", ("q.png", q))])):
            for c in args.levels:
                r = load(url, path, files, c, args.seconds)
                print(f"{name:34s} {c:7d} {r['rps']:8.1f} {r['p50']:8.1f} {r['p99']:8.1f} {r['errors']:7d}")
        batches = [line for line in httpx.get(url + "/metrics").text.splitlines()
                   if line.startswith(("svf_batch_size_sum", "svf_batch_size_count"))]
        vals = {line.split()[0]: float(line.split()[1]) for line in batches}
        if vals.get("svf_batch_size_count"):
            print(f"mean queries per backend call: {vals['svf_batch_size_sum'] / vals['svf_batch_size_count']:.2f}")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
