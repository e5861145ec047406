"""What every stage shares: argument parsing, logging, config loading, atomic JSON writes."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config


def setup(description: str, fold: bool = False, extra=None):
    ap = argparse.ArgumentParser(description=description)
    if extra:
        extra(ap)
    ap.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    if fold:
        ap.add_argument("--fold", type=int, required=True, help="fold 0..3")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "alembic", "mlflow.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        cfg = load_config(args.params)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if fold and args.fold not in (0, 1, 2, 3):
        sys.exit(f"error: unknown fold {args.fold}; choose one of [0, 1, 2, 3]")
    return args, cfg


def write_json(path: str | Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def run(main) -> None:
    """Run a stage's main(); user-facing errors end with one clear line instead of a traceback."""
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        if os.environ.get("SVF_FSS_DEBUG"):
            raise
        logging.getLogger("stage").error("%s: %s", type(e).__name__, e)
        sys.exit(1)
