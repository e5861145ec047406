"""python -m serving.labelstudio: the ML backend for Label Studio (serving/labelstudio/__init__.py)."""
from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

from . import __doc__ as DOC


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m serving.labelstudio", description=DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="models/fold0/1shot")
    ap.add_argument("--backend", default="auto", help="auto, tensorrt, openvino, openvino-int8, onnxruntime, aoti or torch")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9090)
    ap.add_argument("--store", default="labelstudio-sets", help="folder of the annotated examples ('' : memory only)")
    ap.add_argument("--shots", type=int, default=5, help="a label's support set: its most recent examples (default 5)")
    ap.add_argument("--background-threshold", type=float, default=0.5, help="a pixel is background unless some "
                    "label's foreground probability is above this (0 < t < 1)")
    ap.add_argument("--ls-url", default=os.environ.get("LABEL_STUDIO_URL"), help="the Label Studio whose images "
                    "(/data/upload/..., /data/local-files/...) the backend reads, with its token; the only host the "
                    "token is ever sent to (default: LABEL_STUDIO_URL, else the first host a /setup names, pinned)")
    ap.add_argument("--ls-token", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                    help="its API token (default: LABEL_STUDIO_API_KEY, else the one /setup gives); needs --ls-url")
    ap.add_argument("--allow-image-host", action="append", default=[], metavar="HOST",
                    help="another host (name, or name:port) task images may be read from, without a token; repeatable")
    ap.add_argument("--allowed-hosts", default=None, help="comma-separated Host header names this backend answers to "
                    "(default: the loopback names when bound to loopback, else any)")
    ap.add_argument("--basic-auth-user", default=os.environ.get("SVF_FSS_LS_BASIC_AUTH_USER"),
                    help="require HTTP basic auth (Label Studio's connection form sends it); also "
                    "SVF_FSS_LS_BASIC_AUTH_USER")
    ap.add_argument("--basic-auth-pass", default=os.environ.get("SVF_FSS_LS_BASIC_AUTH_PASS"),
                    help="its password; also SVF_FSS_LS_BASIC_AUTH_PASS")
    ap.add_argument("--max-body-mb", type=float, default=32, help="largest request body (a webhook's brush RLE)")
    ap.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest task image")
    ap.add_argument("--fetch-timeout", type=float, default=20.0, help="seconds an image read may take in all")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)     # a line per request to Label Studio otherwise
    from ..guard import LOOPBACK
    from ..model_files import missing_model
    if not 1 <= args.shots <= 10:
        ap.error("--shots must be 1 to 10")
    if not (math.isfinite(args.background_threshold) and 0 < args.background_threshold < 1):
        ap.error(f"--background-threshold {args.background_threshold}: must be between 0 and 1 (0.5: the "
                 "single-class rule)")
    if bool(args.basic_auth_user) != bool(args.basic_auth_pass):
        ap.error("give both --basic-auth-user and --basic-auth-pass, or neither")
    if args.ls_token and not args.ls_url:
        ap.error("a Label Studio token is given (--ls-token or LABEL_STUDIO_API_KEY) without --ls-url: the token "
                 "must only ever go to the Label Studio you name")
    for name in ("max_body_mb", "max_pixels", "fetch_timeout"):
        if not getattr(args, name) > 0:
            ap.error(f"--{name.replace('_', '-')} must be more than 0")
    problem = missing_model(Path(args.model_dir), args.backend)
    if problem:
        ap.error(problem)
    loopback = args.host in LOOPBACK
    hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()] if args.allowed_hosts else \
        (list(LOOPBACK) if loopback else ["*"])
    if not loopback and not args.basic_auth_user:
        logging.getLogger("serving.labelstudio").warning(
            "listening on %s without basic auth: anyone who can reach it can add examples and read predictions; "
            "give --basic-auth-user/--basic-auth-pass", args.host)
    import uvicorn

    from . import create_app
    try:
        app = create_app(args.model_dir, args.backend, args.store or None, args.shots, args.ls_url, args.ls_token,
                         args.background_threshold, allow_image_hosts=[h for v in args.allow_image_host
                                                                         for h in v.split(",") if h.strip()],
                         allowed_hosts=hosts, basic_auth_user=args.basic_auth_user,
                         basic_auth_pass=args.basic_auth_pass, max_body=int(args.max_body_mb * (1 << 20)),
                         max_pixels=args.max_pixels, fetch_deadline=args.fetch_timeout,
                         port=args.port)
    except ValueError as e:
        ap.error(str(e))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
