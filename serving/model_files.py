"""What a model folder holds for each backend, and the one line that says how to make what is missing.

Free of torch, so that `python -m serving` and `python -m serving.predict` refuse a wrong folder or flag in a
fraction of a second instead of after the 5 s import of the inference stack.
"""
from __future__ import annotations

import re
from pathlib import Path

BACKENDS = ("tensorrt", "openvino", "onnxruntime", "aoti", "torch")   # auto tries them in this order (openvino:
#                                                        on a CPU, when it is installed and decodes faster here)
CHOICES = BACKENDS + ("openvino-int8",)   # chosen by name only: the export's INT8 decoder (export.int8), OpenVINO
# what each backend loads from the model folder
MODEL_FILES = {"tensorrt": ("model.engine",), "onnxruntime": ("support_encoder.onnx", "query_decoder.onnx"),
               "openvino": ("support_encoder.onnx", "query_decoder.onnx"),
               "openvino-int8": ("support_encoder.onnx", "int8/query_decoder.onnx"),
               "aoti": ("aoti/model.pt2",), "torch": ("merged.pt",)}


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
    if backend == "openvino-int8":
        make += " with export.int8: true in params.yaml (export/int8.py keeps it only within export.int8_max_drop)"
    return f"{model_dir} holds no exported model for backend {backend} (looked for {files}); make it with {make}"
