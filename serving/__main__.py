"""Start the inference service:  python -m serving --model-dir models/fold0/1shot [--backend auto] [--port 8000]"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import uvicorn

from .app import Limits, create_app
from .backends import BACKENDS

# what each backend loads from the model folder
MODEL_FILES = {"tensorrt": ("model.engine",), "onnxruntime": ("support_encoder.onnx", "query_decoder.onnx"),
               "torch": ("merged.pt",)}


def missing_model(model_dir: Path, backend: str) -> str | None:
    """One line saying which file is missing and which command makes it, or None when one loads."""
    wanted = BACKENDS if backend == "auto" else (backend,)
    if any(all((model_dir / f).exists() for f in MODEL_FILES[b]) for b in wanted):
        return None
    files = ", ".join(f for b in wanted for f in MODEL_FILES[b])
    m = re.search(r"fold(\d)/(\d+)shot$", model_dir.as_posix())
    make = (f"`dvc repro export@{m.group(1)}-{m.group(2)}` (fold {m.group(1)} must be listed in split.folds and "
            f"{m.group(2)} in train.shots in params.yaml)") if m else \
        "`dvc repro` (it exports models/fold<i>/<k>shot for every fold of split.folds and shot count of train.shots)"
    return f"{model_dir} holds no exported model for backend {backend} (looked for {files}); make it with {make}"


def main():
    ap = argparse.ArgumentParser(prog="python -m serving", description="svf-fss inference service")
    ap.add_argument("--model-dir", default="models/fold0/1shot", help="folder with merged.pt / *.onnx / model.engine")
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
    problem = missing_model(Path(args.model_dir), args.backend)
    if problem:
        sys.exit(f"error: {problem}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = Limits(int(args.max_upload_mb * 1024 * 1024), args.max_pixels, args.max_shots, args.timeout,
                    args.max_batch, args.batch_window_ms)
    uvicorn.run(create_app(args.model_dir, args.backend, limits), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
