"""TensorRT engine builder and runtime (TensorRT 10 and 11 Python APIs).

* Builder: parses the ONNX file, one optimisation profile over the dynamic axes (batch, shots),
  a persistent timing cache, and reduced precision: TensorRT 10 takes ``BuilderFlag.FP16``;
  TensorRT 11 has no such flag (networks are strongly typed) so FP16 comes from the ONNX graph
  itself: ``fp16_onnx`` converts the graph's float tensors to float16 with casts at the I/O.
* Runtime: ``TRTRunner`` runs ``execute_async_v3`` on a CUDA stream with torch tensors as buffers.
* Every engine gets a sidecar ``<engine>.json`` with the TensorRT version and the GPU it was built
  for; loading on another version or GPU is refused with both named (TensorRT engines are not
  portable across either).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class EngineMismatchError(RuntimeError):
    pass


def unavailable_reason() -> str | None:
    """Why no engine can be built or run here, or None when TensorRT and a CUDA GPU are present."""
    try:
        import tensorrt
    except ImportError:
        tensorrt = None
    if getattr(tensorrt, "__file__", None) is None:   # absent, or a bare folder such as type stubs
        return ("the tensorrt Python package is not installed (it is an optional extra, `pip install .[tensorrt]`, "
                "and its wheels come from NVIDIA's package index)")
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch"
    return None


def _trt():
    import tensorrt as trt
    return trt


def trt_major() -> int:
    return int(_trt().__version__.split(".")[0])


def device_signature() -> dict:
    trt = _trt()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"tensorrt": trt.__version__, "gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def fp16_onnx(src: str | Path, dst: str | Path) -> Path:
    """An FP16 copy of the ONNX graph (inputs/outputs stay float32), for strongly typed TensorRT 11 builds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    model = onnx.load(str(src))
    g = model.graph
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype("float16"), init.name))
    for node in g.node:
        for a in node.attribute:
            if a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype("float16"), a.t.name))
    casts = []
    for inp in g.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT:
            new = inp.name + "_fp16"
            for node in g.node:
                node.input[:] = [new if x == inp.name else x for x in node.input]
            casts.append(helper.make_node("Cast", [inp.name], [new], to=TensorProto.FLOAT16))
    for out in g.output:
        if out.type.tensor_type.elem_type == TensorProto.FLOAT:
            old = out.name + "_fp16"
            for node in g.node:
                node.output[:] = [old if x == out.name else x for x in node.output]
            g.node.append(helper.make_node("Cast", [old], [out.name], to=TensorProto.FLOAT))
    for c in reversed(casts):
        g.node.insert(0, c)
    del g.value_info[:]
    onnx.save(model, str(dst))
    return Path(dst)


def build_engine(onnx_path: str | Path, engine_path: str | Path, size: int, max_batch: int = 8, max_shots: int = 5,
                 fp16: bool = True, timing_cache: str | Path | None = None, workspace_gb: float = 2.0,
                 min_shots: int = 1) -> dict:
    """Build and serialise an engine; returns its description (also written to ``<engine>.json``).
    Shots range over [min_shots, max_shots] (equal for a fixed-shot model)."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"cannot build a TensorRT engine: {reason}")
    trt = _trt()
    major = trt_major()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    precision = "fp32"
    src = Path(onnx_path)
    if fp16 and major >= 11:
        src = fp16_onnx(onnx_path, Path(engine_path).with_suffix(".fp16.onnx"))
        precision = "fp16 (from the ONNX graph)"
    flags = 0
    if major >= 11:   # strongly typed: precision follows the graph's types
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {src}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16 and major < 11:
        if builder.platform_has_fast_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
            precision = "fp16 (builder flag)"
        else:
            log.warning("this GPU has no fast FP16; building in FP32")
    profile = builder.create_optimization_profile()
    opt_b, opt_k = 1, min_shots   # the serving case: one query, the fewest shots
    shapes = {"query": lambda b, k: (b, 3, size, size), "support": lambda b, k: (b, k, 3, size, size),
              "support_mask": lambda b, k: (b, k, size, size)}
    for name, f in shapes.items():
        profile.set_shape(name, f(1, min_shots), f(opt_b, opt_k), f(max_batch, max_shots))
    config.add_optimization_profile(profile)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    engine_path = Path(engine_path)
    tmp = engine_path.with_name(engine_path.name + ".tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, engine_path)
    if timing_cache:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    info = {**device_signature(), "precision": precision, "max_batch": max_batch, "max_shots": max_shots, "size": size}
    Path(str(engine_path) + ".json").write_text(json.dumps(info, indent=1))
    return info


class TRTRunner:
    """Runs a serialised engine with torch CUDA tensors; the call signature matches the PyTorch model."""

    def __init__(self, engine_path: str | Path):
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"cannot run a TensorRT engine: {reason}")
        engine_path = Path(engine_path)
        meta_file = Path(str(engine_path) + ".json")
        if not engine_path.exists():
            raise FileNotFoundError(f"engine {engine_path} is missing; run the export stage on a machine with TensorRT")
        built = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        here = device_signature()
        for key in ("tensorrt", "gpu", "compute_capability"):
            if built.get(key) != here[key]:
                raise EngineMismatchError(
                    f"engine {engine_path} was built for {key} {built.get(key)!r} but this machine has {here[key]!r} "
                    f"(built: TensorRT {built.get('tensorrt')} on {built.get('gpu')}; here: TensorRT {here['tensorrt']} "
                    f"on {here['gpu']}); rebuild it here with the export stage")
        trt = _trt()
        self.meta = built
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise EngineMismatchError(f"TensorRT {trt.__version__} could not deserialise {engine_path}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()

    def __call__(self, query: torch.Tensor, support: torch.Tensor, support_mask: torch.Tensor) -> torch.Tensor:
        dev = torch.device("cuda")
        inputs = {"query": query, "support": support, "support_mask": support_mask}
        for name, t in inputs.items():
            t = t.to(dev, torch.float32).contiguous()
            inputs[name] = t
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        dims = self.context.get_tensor_shape("logits")   # trt.Dims: indexable, not declared iterable
        shape = tuple(dims[i] for i in range(len(dims)))
        out = torch.empty(shape, dtype=torch.float32, device=dev)
        self.context.set_tensor_address("logits", out.data_ptr())
        with torch.cuda.stream(self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return out
