"""A Triton Inference Server model repository for the exported model.

<repo>/svf_fss_onnx/{config.pbtxt, 1/model.onnx}        ONNX Runtime backend (always)
<repo>/svf_fss_trt/{config.pbtxt, 1/model.plan}         TensorRT backend (when an engine exists)
Batch and shots are dynamic dimensions of the tensors (-1), so max_batch_size is 0.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.data.download import link_or_copy


def config_pbtxt(name: str, platform: str, size: int, gpu: bool, shots: int = -1) -> str:
    def tensor(n, dims):
        return f'  {{\n    name: "{n}"\n    data_type: TYPE_FP32\n    dims: [ {", ".join(str(d) for d in dims)} ]\n  }}'
    inputs = ",\n".join([tensor("query", [-1, 3, size, size]), tensor("support", [-1, shots, 3, size, size]),
                         tensor("support_mask", [-1, shots, size, size])])
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    return (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: 0\n'
            f"input [\n{inputs}\n]\noutput [\n{tensor('logits', [-1, 2, size, size])}\n]\n"
            f"instance_group [ {{ count: 1, kind: {kind} }} ]\n")


def write_repository(repo: str | Path, onnx_path: str | Path, size: int, engine_path: str | Path | None = None,
                     shots: int = -1) -> list[Path]:
    """``shots``: -1 (any), or the one shot count a fixed-shot model (BAM with K > 1) takes."""
    repo = Path(repo)
    written = []
    models = [("svf_fss_onnx", "onnxruntime_onnx", Path(onnx_path), "model.onnx", False)]
    if engine_path and Path(engine_path).exists():
        models.append(("svf_fss_trt", "tensorrt_plan", Path(engine_path), "model.plan", True))
    for name, platform, src, fname, gpu in models:
        d = repo / name
        (d / "1").mkdir(parents=True, exist_ok=True)
        link_or_copy(src, d / "1" / fname)
        (d / "config.pbtxt").write_text(config_pbtxt(name, platform, size, gpu, shots))
        written.append(d)
    return written
