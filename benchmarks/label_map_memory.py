"""Peak memory of the service for one /v1/label-map request: a 4096x4096 query against 32 registered sets
(issue 35, item 6), on a tiny exported model (the label map's cost does not depend on the model).

    .venv/bin/python benchmarks/label_map_memory.py [--root CHECKOUT] [--model-dir DIR]

Two services: one with the pixel budget raised so that the request is served (its peak resident memory
before and after the request, from /proc/<pid>/status VmHWM, and the request's time), and one with the
default budget (whether it is served or refused, and how fast). ``--root`` runs another checkout's service
(an earlier commit: the "before").
"""
from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from labelstudio_load import tiny_model  # noqa: E402

SIDE, SETS = 4096, 32


def vm_hwm(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def serve(root: str, model: Path, store: Path, *flags) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "serving", "--model-dir", str(model), "--backend", "onnxruntime",
                          "--port", str(port), "--store", str(store), "--max-upload-mb", "64", *flags], cwd=root,
                         env=dict(os.environ, PYTHONPATH=root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return p, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the service did not start")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--model-dir", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lm-mem-"))
    model = Path(args.model_dir) if args.model_dir else tiny_model(work)
    yy, xx = np.mgrid[:SIDE, :SIDE]
    query = png(np.stack([(xx % 256), (yy % 256), ((xx + yy) % 256)], -1).astype(np.uint8))
    support = png(np.random.default_rng(0).integers(0, 255, (60, 60, 3), dtype=np.uint8))
    mask = np.zeros((60, 60), np.uint8)
    mask[20:40, 20:40] = 1
    mask = png(mask)
    print(f"service: {args.root}; query {SIDE}x{SIDE} ({len(query) / 1e6:.1f} MB PNG), {SETS} sets")
    for label, flags in (("budget raised", ("--max-request-pixels", str(1 << 40))), ("default budget", ())):
        p, url = serve(args.root, model, work / f"store-{len(flags)}", *flags)
        try:
            for i in range(SETS):
                httpx.put(f"{url}/v1/support-sets/c{i}", files=[("supports", ("s.png", support)),
                                                              ("masks", ("m.png", mask))]).raise_for_status()
            before = vm_hwm(p.pid)
            t = time.perf_counter()
            r = httpx.post(url + "/v1/label-map", files=[("query", ("q.png", query))],
                           data={"sets": [f"c{i}" for i in range(SETS)]}, timeout=600)
            took = time.perf_counter() - t
            print(f"{label:15s}: HTTP {r.status_code} in {took:5.1f} s; peak resident memory {before:7.0f} MB before, "
                  f"{vm_hwm(p.pid):7.0f} MB after" + ("" if r.status_code == 200 else f"  ({r.json()['error'][:90]})"),
                  flush=True)
        finally:
            p.terminate()
            p.wait(15)


if __name__ == "__main__":
    main()
