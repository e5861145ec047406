"""Start the inference service:  python -m serving --model-dir models/fold0 [--backend auto] [--port 8000]"""
from __future__ import annotations

import argparse
import logging

import uvicorn

from .app import Limits, create_app
from .backends import BACKENDS


def main():
    ap = argparse.ArgumentParser(description="svf-fss inference service")
    ap.add_argument("--model-dir", default="models/fold0", help="folder with merged.pt / *.onnx / model.engine")
    ap.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS,
                    help="auto: TensorRT, else ONNX Runtime, else PyTorch")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-upload-mb", type=float, default=20)
    ap.add_argument("--max-pixels", type=int, default=4096 * 4096)
    ap.add_argument("--max-shots", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--batch-window-ms", type=float, default=5.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = Limits(int(args.max_upload_mb * 1024 * 1024), args.max_pixels, args.max_shots, args.timeout,
                    args.max_batch, args.batch_window_ms)
    uvicorn.run(create_app(args.model_dir, args.backend, limits), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
