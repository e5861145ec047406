"""/healthz while the Open Inference Protocol parses and encodes JSON tensors: its worst and 99th-percentile
answer times with one large JSON request after another in flight, beside the same requests in binary form.

    python benchmarks/healthz_json.py [--model-dir models/fold0/1shot] [--batch 80] [--seconds 10]

Starts `python -m serving` (ONNX Runtime) on a free 127.0.0.1 port; one client sends /v2 requests of
``--batch`` queries with JSON tensors and JSON output (then binary tensors and output), another polls
/healthz every 10 ms. JSON work runs in the service's worker threads and holds the interpreter: a request
past the service's JSON limit is refused (413/400 naming the binary extension) instead of stalling it.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(size: int, batch: int, binary: bool) -> tuple[bytes, dict]:
    rng = np.random.default_rng(0)
    arrays = {"query": rng.standard_normal((batch, 3, size, size), np.float32),
              "support": rng.standard_normal((batch, 1, 3, size, size), np.float32),
              "support_mask": (rng.random((batch, 1, size, size)) > 0.5).astype(np.float32)}
    if not binary:
        doc = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": "FP32", "data": a.ravel().tolist()}
                          for n, a in arrays.items()]}
        return json.dumps(doc).encode(), {}
    doc = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": "FP32",
                       "parameters": {"binary_data_size": a.nbytes}} for n, a in arrays.items()],
           "parameters": {"binary_data_output": True}}
    head = json.dumps(doc).encode()
    return head + b"".join(a.tobytes() for a in arrays.values()), {"Inference-Header-Content-Length": str(len(head))}


def main():
    ap = argparse.ArgumentParser(prog="python benchmarks/healthz_json.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(ROOT / "models" / "fold0" / "1shot"))
    ap.add_argument("--batch", type=int, default=80)
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serving", "--model-dir", args.model_dir, "--backend", "onnxruntime",
                             "--port", str(port), "--max-upload-mb", "64", "--store", ""],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        size = httpx.get(url + "/v2/models/svf_fss").json()["inputs"][0]["shape"][-1]
        print(f"model {args.model_dir} ({size}x{size}), batch {args.batch}, {args.seconds:.0f} s a form")
        for binary in (False, True):
            content, headers = body(size, args.batch, binary)
            stop, times, answers = threading.Event(), [], {}

            def load():
                with httpx.Client(timeout=120) as c:
                    while not stop.is_set():
                        r = c.post(url + "/v2/models/svf_fss/infer", content=content, headers=headers)
                        answers[r.status_code] = answers.get(r.status_code, 0) + 1

            t = threading.Thread(target=load)
            t.start()
            end = time.time() + args.seconds
            with httpx.Client(timeout=30) as c:
                while time.time() < end:
                    t0 = time.perf_counter()
                    c.get(url + "/healthz")
                    times.append(time.perf_counter() - t0)
                    time.sleep(0.01)
            stop.set()
            t.join()
            ms = np.array(times) * 1e3
            print(f"{'binary' if binary else 'JSON'} tensors ({len(content) / 1e6:.1f} MB a request; answers "
                  f"{answers}): /healthz max {ms.max():.0f} ms, p99 {np.percentile(ms, 99):.0f} ms, "
                  f"median {np.median(ms):.1f} ms over {len(ms)} polls")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
