"""Load on the real service over loopback: requests per second and p50/p99 latency at 1, 4 and 16
concurrent clients, for /v1/segment (supports uploaded each time) and for a registered support set,
with /healthz polled every 50 ms meanwhile; and, before and after, the backend's own batched
throughput on the same queries (in this process, no HTTP), so the service's overhead is one ratio;
and between the two, the service's own work without HTTP (``without_http``), which splits that
overhead into the image work and batching on one side and HTTP on the other.

    python benchmarks/serve_load.py [--model-dir models/fold0/1shot] [--backend auto] [--seconds 10]
    python benchmarks/serve_load.py --random-model resnet50_deep:473 --backend torch --image-size 500

``--random-model ARCH:SIZE`` serves a merged PFENet with random weights at the recipe's head width
instead of a trained one: the cost of a request does not depend on the weights, so this measures the
service at the paper's sizes (on a GPU, the torch backend) without training first.

Starts `python -m serving` on a free 127.0.0.1 port, drives it with threads of raw keep-alive
socket clients (``RawClient``) for a bounded time per level, then stops it. The goal printed at the
end: the registered set at 16 clients serves at least 80% of the backend's batched throughput, and
/healthz answers within 100 ms.
"""
from __future__ import annotations

import argparse
import atexit
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.synthetic import generate_image  # noqa: E402
from serving.app import DEFAULT_WORKERS  # noqa: E402
from serving.model_files import missing_model  # noqa: E402
from serving.inputs import png_bytes  # noqa: E402


def episode(size: int, jpeg: bool = False):
    """(query, support, mask) files: images as PNG (or JPEG at quality 90, as photos come), the mask PNG."""
    def image(a):
        if not jpeg:
            return png_bytes(a)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=90)
        return buf.getvalue()
    qi, _ = generate_image(0, "val", size, 11)
    si, sl = generate_image(1, "val", size, 11)
    cls = int(next(c for c in np.unique(sl) if c not in (0, 255)))
    return image(qi), image(si), png_bytes(np.where(sl == cls, 255, 0).astype(np.uint8))


def random_model(spec: str, out: Path) -> Path:
    """``out/merged.pt``: a merged PFENet (recipe head, reduce_dim 256) on backbone ARCH with random
    weights and test size SIZE, from ``spec`` = "ARCH:SIZE"."""
    from pipeline import adapter as adapter_io
    from pipeline.config import load_config
    from pipeline.models import build_model
    from pipeline.svf import merge_svf
    arch, _, size = spec.partition(":")
    if not size.isdigit():
        sys.exit(f"--random-model takes ARCH:SIZE, e.g. resnet50_deep:473 (got {spec!r})")
    try:
        cfg = load_config({"model": {"backbone": arch, "pretrained": "random"}, "eval": {"test_size": int(size)}})
    except ValueError as e:
        sys.exit(f"--random-model {spec}: {e}")
    model, _ = build_model(cfg)
    out.mkdir(parents=True, exist_ok=True)
    adapter_io.save(adapter_io.merged_state(merge_svf(model).eval(), cfg), out / "merged.pt")
    return out


def pct(values, p: float) -> float:
    values = sorted(values)
    return 1000 * values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


def backend_alone(model_dir: str, backend: str, q: bytes, s: bytes, m: bytes, batch: int):
    """(backend, the set's features, run): ``run(seconds)`` gives the episodes per second of the backend
    alone and its CPU per episode: one encoded support set, queries decoded ``batch`` at a time,
    preprocessed once (what the service's batcher hands the backend)."""
    from serving.backends import load_backend
    from serving.inputs import query_tensor, read_image, read_mask, support_tensors
    b = load_backend(model_dir, backend)
    big = 1 << 30
    img = read_image(s, "support", big)
    feats = b.encode(*support_tensors([img], [read_mask(m, "mask", img.shape[:2], big)], b.size))
    xq, _ = query_tensor(read_image(q, "query", big), b.size)
    x = np.repeat(xq, batch, 0)
    fb = type(b).batch_features([feats] * batch)    # one set for all: what the service's batcher passes
    b.decode(x, fb)

    def run(seconds: float) -> tuple[float, float]:
        """(episodes per second, ms of CPU per episode: all the process's threads, the runtime's too)."""
        n, t0, cpu0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            b.decode(x, fb)
            n += batch
        return n / (time.perf_counter() - t0), 1000 * (time.process_time() - cpu0) / n
    return b, feats, run


def without_http(b, feats, q: bytes, clients: int, seconds: float, workers: int, max_batch: int) -> dict:
    """The service's own work for a registered set, in this process and without HTTP: ``clients``
    coroutines each decode and preprocess the query in a pool of ``workers`` threads, wait for the
    micro-batcher, map the logits back and encode the PNG in the pool (serving/app.py's functions,
    the same CPU settings). What it falls short of the backend alone is the image work and the
    batching; what the service falls short of it is HTTP."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    import torch
    from serving.app import Batcher, Limits, answer, prepare_query, share_cpu
    from serving.inputs import PixelBudget

    class Sizes:                     # the batch-size histogram's one method the batcher calls
        calls = queries = 0

        def observe(self, n):
            self.calls, self.queries = self.calls + 1, self.queries + n
    limits, sizes = Limits(max_batch=max_batch), Sizes()
    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    share_cpu(b)

    async def run():
        loop = asyncio.get_running_loop()
        batcher = Batcher(b, limits, sizes)
        batcher.start()
        done, stop = [0], loop.time() + seconds

        async def client():
            while loop.time() < stop:
                x, valid, kept = await loop.run_in_executor(pool, prepare_query, q, "query", b.size, limits.max_pixels,
                                                            PixelBudget(limits.max_request_pixels), "png")
                logits = await batcher.decode(x, feats)
                await loop.run_in_executor(pool, answer, logits, valid, kept, "png", b.name)
                done[0] += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
        await batcher.stop()
        return done[0], wall
    with ThreadPoolExecutor(workers, thread_name_prefix="svf-io") as pool:
        try:
            cpu0 = time.process_time()
            n, wall = asyncio.run(run())
            cpu = time.process_time() - cpu0
        finally:
            torch.set_num_threads(threads)
            sys.setswitchinterval(interval)
    return {"rps": n / wall, "cpu_ms": 1000 * cpu / max(1, n), "batch": sizes.queries / max(1, sizes.calls)}


class RawClient:
    """HTTP/1.1 keep-alive on one socket, the request's bytes built once (by httpx) and sent as they are:
    on a machine the load generator shares with the service, its own CPU per request stays a fraction of
    the service's (httpx's client spent about as much per request as the service's HTTP layer)."""

    def __init__(self, url: str, method: str, path: str, files=None):
        req = httpx.Request(method, url + path, files=files)
        body = req.read()
        head = "".join(f"{k}: {v}\r\n" for k, v in req.headers.items() if k.lower() != "content-length")
        self.raw = f"{method} {path} HTTP/1.1\r\n{head}content-length: {len(body)}\r\n\r\n".encode() + body
        self.address = (req.url.host, req.url.port)
        self.sock = self.file = None

    def __call__(self) -> int:
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=60)
            self.file = self.sock.makefile("rb")
        self.sock.sendall(self.raw)
        status = int(self.file.readline().split()[1])
        length, close = 0, False
        while (line := self.file.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            if k.lower() == "content-length":
                length = int(v)
            close |= k.lower() == "connection" and v.strip().lower() == "close"
        self.file.read(length)
        if close:
            self.close()
        return status

    def close(self):
        if self.sock is not None:
            self.file.close()
            self.sock.close()
            self.sock = self.file = None


def load(url: str, path: str, files, clients: int, seconds: float, server_pid: int):
    import psutil
    server, me = psutil.Process(server_pid), psutil.Process()
    cpu0, mine0 = sum(server.cpu_times()[:2]), sum(me.cpu_times()[:2])
    lat, errors, health = [], [], []
    stop = time.perf_counter() + seconds

    def prober():                        # liveness as an orchestrator sees it while the load runs
        c = RawClient(url, "GET", "/healthz")
        while time.perf_counter() < stop:
            t = time.perf_counter()
            c()
            health.append(time.perf_counter() - t)
            time.sleep(0.05)
        c.close()

    def worker():
        c = RawClient(url, "POST", path, files)
        while time.perf_counter() < stop:
            t = time.perf_counter()
            status = c()
            dt = time.perf_counter() - t
            (lat if status == 200 else errors).append(dt)
        c.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)] + [threading.Thread(target=prober)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu, mine = sum(server.cpu_times()[:2]) - cpu0, sum(me.cpu_times()[:2]) - mine0
    n = max(1, len(lat))
    return {"rps": len(lat) / wall, "server_cpu_ms": 1000 * cpu / n, "client_cpu_ms": 1000 * mine / n,
            "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "ok": len(lat), "errors": len(errors),
            "health_p99": pct(health, 0.99), "health_max": pct(health, 1.0)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(ROOT / "models" / "fold0" / "1shot"))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--random-model", metavar="ARCH:SIZE", help="serve a random-weight merged PFENet instead of "
                    "--model-dir, e.g. resnet50_deep:473 (the recipe's backbone and test size)")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--image-size", type=int, default=128, help="side of the uploaded test images")
    ap.add_argument("--jpeg", action="store_true", help="upload the images as JPEG (quality 90) instead of PNG")
    ap.add_argument("--max-batch", type=int, default=8, help="the service's batch (and the backend measurement's)")
    ap.add_argument("--workers", type=int, help="the service's image worker threads (default: the service's)")
    args = ap.parse_args()
    if args.random_model:
        args.model_dir = str(random_model(args.random_model, Path(tempfile.mkdtemp(prefix="svf-random-model-"))))
        atexit.register(shutil.rmtree, args.model_dir, True)
        print(f"random-weight model {args.random_model} in {args.model_dir}")
    problem = missing_model(Path(args.model_dir), args.backend)
    if problem:
        sys.exit(f"error: {problem}")
    q, s, m = episode(args.image_size, args.jpeg)
    b, feats, alone = backend_alone(args.model_dir, args.backend, q, s, m, args.max_batch)
    first, cpu_first = alone(args.seconds)
    print(f"backend alone ({b.name}, batch {args.max_batch}, this process): {first:.1f} episodes/s, "
          f"{cpu_first:.1f} ms of CPU each")
    top = max(args.levels)
    workers = args.workers or DEFAULT_WORKERS
    bare = without_http(b, feats, q, top, args.seconds, workers, args.max_batch)
    print(f"the service's work without HTTP ({top} clients in this process, {workers} image threads): "
          f"{bare['rps']:.1f} queries/s, {bare['cpu_ms']:.1f} ms of CPU each, {bare['batch']:.2f} queries per call")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()      # the service's log, shown if it does not start
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))   # the caller's kept
    cmd = [sys.executable, "-m", "serving", "--model-dir", args.model_dir, "--backend", args.backend,
           "--port", str(port), "--max-batch", str(args.max_batch), "--store", "none"]
    cmd += ["--workers", str(args.workers)] if args.workers else []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=path), stdout=subprocess.DEVNULL, stderr=log)
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
                log.seek(0)
                sys.exit("the service did not start; its last words:\n" + log.read().decode(errors="replace")[-2000:])
            time.sleep(0.3)
        info = ready.json()
        ext = "jpg" if args.jpeg else "png"
        httpx.put(url + "/v1/support-sets/bench", files=[("supports", (f"s.{ext}", s)), ("masks", ("m.png", m))])
        print(f"service: backend {info['backend']}, model input {info['input_size']} px, uploads "
              f"{args.image_size}x{args.image_size} {'JPEG' if args.jpeg else 'PNG'}, {args.seconds:g} s per level, "
              f"{os.cpu_count()} CPUs")
        print(f"{'endpoint':34s} {'clients':>7s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s} "
              f"{'healthz p99':>11s} {'max ms':>7s} {'server CPU ms/req':>17s} {'client CPU':>10s}")
        results = {}
        for name, path, files in (
                ("/v1/segment (1 shot uploaded)", "/v1/segment",
                 [("query", (f"q.{ext}", q)), ("supports", (f"s.{ext}", s)), ("masks", ("m.png", m))]),
                ("/v1/support-sets/bench/segment", "/v1/support-sets/bench/segment", [("query", (f"q.{ext}", q))])):
            for c in args.levels:
                r = results[path, c] = load(url, path, files, c, args.seconds, proc.pid)
                print(f"{name:34s} {c:7d} {r['rps']:8.1f} {r['p50']:8.1f} {r['p99']:8.1f} {r['errors']:7d} "
                      f"{r['health_p99']:11.1f} {r['health_max']:7.1f} {r['server_cpu_ms']:17.1f} {r['client_cpu_ms']:10.1f}")
        batches = [line for line in httpx.get(url + "/metrics").text.splitlines()
                   if line.startswith(("svf_batch_size_sum", "svf_batch_size_count"))]
        vals = {line.split()[0]: float(line.split()[1]) for line in batches}
        if vals.get("svf_batch_size_count"):
            print(f"mean queries per backend call: {vals['svf_batch_size_sum'] / vals['svf_batch_size_count']:.2f}")
        # measured again after the load, the service idle: the ratio divides by the mean of the two, and
        # their spread says how far this machine drifted meanwhile (281-436 episodes/s seen on 2 shared cores)
        last, cpu_last = alone(args.seconds)
        batched = (first + last) / 2
        print(f"backend alone again, after the load: {last:.1f} episodes/s, {cpu_last:.1f} ms of CPU each (mean of "
              f"both {batched:.1f})")
        r = results["/v1/support-sets/bench/segment", top]
        worst = max(v["health_max"] for v in results.values())
        print(f"registered set at {top} clients / backend alone: {r['rps']:.1f} / {batched:.1f} = "
              f"{r['rps'] / batched:.2f} (goal >= 0.80: {'met' if r['rps'] >= 0.8 * batched else 'NOT met'}); "
              f"slowest /healthz under load {worst:.1f} ms (goal <= 100: {'met' if worst <= 100 else 'NOT met'})")
        print(f"without HTTP / backend alone: {bare['rps']:.1f} / {batched:.1f} = {bare['rps'] / batched:.2f} "
              f"(the image work and the batching); with HTTP / without: {r['rps'] / bare['rps']:.2f}")
        print(f"CPU per registered-set query at {top} clients: {r['server_cpu_ms']:.1f} ms in the service, "
              f"{bare['cpu_ms']:.1f} without HTTP, {(cpu_first + cpu_last) / 2:.1f} in the backend alone at batch "
              f"{args.max_batch}; the clients run on the same {os.cpu_count()} CPUs")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
