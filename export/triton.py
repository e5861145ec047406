"""The models as the Open Inference Protocol (KServe v2 / Triton) names them, and a Triton model repository.

Three models, the same names, tensors and shapes in the Triton repository written here and on the
service's /v2 endpoints (serving/kserve.py), so a client written against one works against the other:
  svf_fss                  query[B,3,S,S], support[B,K,3,S,S], support_mask[B,K,S,S] -> logits[B,2,S,S]
  svf_fss_support_encoder  support, support_mask -> the head's support features (PFENet: prototype,
                           support_feat4; BAM: + support_gram)
  svf_fss_query_decoder    query, *support features -> logits     (a client caches a set's features)
All FP32; -1 is a dynamic axis (batch; shots unless the model takes exactly K). Triton repository:
<repo>/<name>/{config.pbtxt, 1/model.onnx} for the three, and svf_fss_trt/{config.pbtxt, 1/model.plan}
when a TensorRT engine exists. Batch is a tensor dimension (max_batch_size 0).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.data.download import link_or_copy

FULL, ENCODER, DECODER, ENGINE = "svf_fss", "svf_fss_support_encoder", "svf_fss_query_decoder", "svf_fss_trt"
ONNX_FILES = {FULL: "model.onnx", ENCODER: "support_encoder.onnx", DECODER: "query_decoder.onnx"}

Tensors = list[tuple[str, list[int]]]


def signatures(size: int, shots: int, features: Tensors) -> dict[str, tuple[Tensors, Tensors]]:
    """{model name: (inputs, outputs)}; ``shots`` -1 (any) or the fixed count; ``features``: the encoder's
    outputs with their shapes (-1 where dynamic)."""
    query, logits = ("query", [-1, 3, size, size]), ("logits", [-1, 2, size, size])
    support, mask = ("support", [-1, shots, 3, size, size]), ("support_mask", [-1, shots, size, size])
    return {FULL: ([query, support, mask], [logits]), ENCODER: ([support, mask], list(features)),
            DECODER: ([query, *features], [logits])}


def onnx_outputs(path: str | Path) -> Tensors:
    """The graph's outputs and shapes, a named (dynamic) dimension as -1."""
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    return [(o.name, [d.dim_value if d.HasField("dim_value") else -1 for d in o.type.tensor_type.shape.dim])
            for o in graph.output]


def config_pbtxt(name: str, platform: str, inputs: Tensors, outputs: Tensors, gpu: bool) -> str:
    def block(tensors):
        return ",\n".join(f'  {{\n    name: "{n}"\n    data_type: TYPE_FP32\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'
                          for n, dims in tensors)
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    return (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: 0\n'
            f"input [\n{block(inputs)}\n]\noutput [\n{block(outputs)}\n]\n"
            f"instance_group [ {{ count: 1, kind: {kind} }} ]\n")


def write_repository(repo: str | Path, model_dir: str | Path, size: int, engine_path: str | Path | None = None,
                     shots: int = -1) -> list[Path]:
    """From the exported ONNX files of ``model_dir``; ``shots``: -1 (any), or the one shot count a
    fixed-shot model (BAM with K > 1) takes."""
    repo, model_dir = Path(repo), Path(model_dir)
    sigs = signatures(size, shots, onnx_outputs(model_dir / ONNX_FILES[ENCODER]))
    models = [(name, "onnxruntime_onnx", model_dir / f, "model.onnx", False, sigs[name]) for name, f in ONNX_FILES.items()]
    if engine_path and Path(engine_path).exists():
        models.append((ENGINE, "tensorrt_plan", Path(engine_path), "model.plan", True, sigs[FULL]))
    written = []
    for name, platform, src, fname, gpu, (inputs, outputs) in models:
        d = repo / name
        (d / "1").mkdir(parents=True, exist_ok=True)
        link_or_copy(src, d / "1" / fname)
        (d / "config.pbtxt").write_text(config_pbtxt(name, platform, inputs, outputs, gpu))
        written.append(d)
    return written
