"""Start the inference service:  python -m serving --model-dir models/fold0/1shot [--backend auto] [--port 8000]"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .guard import LOOPBACK, load_keys
from .model_files import CHOICES, missing_model

log = logging.getLogger("serving")

def main():
    ap = argparse.ArgumentParser(prog="python -m serving", description="svf-fss inference service")
    ap.add_argument("--model-dir", default="models/fold0/1shot", help="folder with merged.pt / *.onnx / model.engine")
    ap.add_argument("--backend", default="auto", choices=("auto",) + CHOICES,
                    help="auto: TensorRT, else ONNX Runtime, else PyTorch")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-upload-mb", type=float, default=20)
    ap.add_argument("--max-pixels", type=int, default=4096 * 4096)
    ap.add_argument("--max-shots", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-json-mb", type=float, default=2, help="/v2: JSON parsed or written per request; beyond it "
                    "tensors go binary (JSON work holds the interpreter: 19 MB stalled /healthz 526 ms)")
    ap.add_argument("--batch-window-ms", type=float, default=5.0)
    ap.add_argument("--max-request-pixels", type=int, default=4 * 4096 * 4096, help="all images of one request")
    ap.add_argument("--max-inflight", type=int, default=64, help="/v1 requests at once; more answer 503")
    ap.add_argument("--body-timeout", type=float, default=60.0,
                    help="seconds a request body may take to arrive whole (a trickling upload answers 408)")
    ap.add_argument("--workers", type=int, default=None,
                    help="threads that decode and encode images off the event loop (default: the CPUs, at most 4)")
    ap.add_argument("--max-connections", type=int, default=512, help="open connections at once (uvicorn)")
    ap.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle keep-alive connection stays open")
    ap.add_argument("--header-timeout", type=float, default=10.0,
                    help="seconds a connection may take to send a complete request line and headers")
    ap.add_argument("--api-keys", default=None, help="file of API keys, one per line (also: SVF_FSS_API_KEYS, "
                    "comma-separated); without any the service is open")
    ap.add_argument("--allowed-hosts", default=None, help="comma-separated Host header names (default: the loopback "
                    "names when bound to loopback, else any)")
    ap.add_argument("--cors-origins", default="", help="comma-separated browser origins (default: no CORS)")
    ap.add_argument("--store", default="support_sets", help="folder where registered support sets persist "
                    "(default: support_sets); 'none' keeps them in memory only")
    ap.add_argument("--max-sets", type=int, default=100, help="support sets per API key")
    ap.add_argument("--max-set-mb", type=float, default=256, help="megabytes of support-set features per API key")
    ap.add_argument("--access-log", action="store_true", help="log a line per request (off by default: /metrics "
                    "counts requests by route and status, and the line cost 9%% of the event loop at 200 req/s)")
    args = ap.parse_args()
    for name in ("max_upload_mb", "max_pixels", "max_shots", "timeout", "max_batch", "max_request_pixels",
                 "max_inflight", "body_timeout", "workers", "max_connections", "keep_alive", "header_timeout",
                 "max_sets", "max_set_mb", "batch_window_ms", "max_json_mb"):
        value = getattr(args, name)
        if value is not None and (value < 0 or (value == 0 and name != "batch_window_ms")):
            ap.error(f"--{name.replace('_', '-')} {value:g}: must be "
                     f"{'0 or more' if name == 'batch_window_ms' else 'more than 0'}")
    problem = missing_model(Path(args.model_dir), args.backend)
    if problem:
        sys.exit(f"error: {problem}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        keys = load_keys(args.api_keys)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    loopback = args.host in LOOPBACK
    hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()] if args.allowed_hosts else \
        (list(LOOPBACK) if loopback else ["*"])
    if not keys and not loopback:
        log.warning("the service listens on %s without API keys: anyone who can reach it can segment and read, "
                    "overwrite or delete support sets; give --api-keys (or SVF_FSS_API_KEYS)", args.host)
    import uvicorn                     # the inference stack (torch) only once the arguments are sound

    from .app import DEFAULT_WORKERS, Limits, create_app
    from .guard import guarded_protocol
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
                    max_request_pixels=args.max_request_pixels, max_inflight=args.max_inflight,
                    body_timeout_s=args.body_timeout,
                    max_shots=args.max_shots, timeout_s=args.timeout, max_batch=args.max_batch,
                    batch_window_ms=args.batch_window_ms, max_json_bytes=int(args.max_json_mb * 1024 * 1024))
    app = create_app(args.model_dir, args.backend, limits, keys=keys, allowed_hosts=hosts,
                     cors_origins=[o.strip() for o in args.cors_origins.split(",") if o.strip()], workers=args.workers or DEFAULT_WORKERS,
                     store=None if args.store == "none" else args.store, max_sets=args.max_sets,
                     max_set_bytes=int(args.max_set_mb * 1024 * 1024))
    log.info("the page: http://%s:%d/ui", args.host if ":" not in args.host else f"[{args.host}]", args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=args.access_log,
                timeout_keep_alive=args.keep_alive, limit_concurrency=args.max_connections,
                http=guarded_protocol(args.max_connections, args.header_timeout))


if __name__ == "__main__":
    main()
