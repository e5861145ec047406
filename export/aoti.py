"""Merged PyTorch model -> AOTInductor package (``model.pt2``), the model that C++ loads without Python.

torch.export traces the 3-input few-shot signature (batch and shots dynamic, as in the ONNX graph) and
AOTInductor compiles it ahead of time into a shared library inside a zip package; LibTorch's
``AOTIModelPackageLoader`` runs it from C++ (cpp/), ``torch._inductor.aoti_load_package`` from Python
(the service's ``aoti`` backend), with the same kernels, so both give the same logits bit for bit.
Trade-off measured on the 2-core CPU: compiling the default model takes about a minute of g++ and the
package is machine-specific (CPU packages are built with this CPU's instruction set, CUDA ones for
this GPU), like a TensorRT engine; ONNX stays the portable artefact.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

from .onnx_export import IMAGE_AXES, _axes, _dims, _example

SIZE_KEY = "svf_fss.input_size"   # read by cpp/src/aoti_backend.cpp
# compiling or loading a CPU package needs no CUDA: torch's note that it found no CUDA runtime would only alarm
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def export_aoti(model: torch.nn.Module, path: str | Path, size: int, metadata: dict | None = None,
                device: str = "cpu") -> Path:
    """Compile ``model`` (eval mode) for ``device`` into the package ``path``; ``metadata`` (str -> str)
    travels inside it with the input size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dims, k = _dims(model)
    example = tuple(t.to(device) for t in _example(size, k))
    model = model.eval().to(device)
    dynamic = tuple(_axes(IMAGE_AXES[n], dims) for n in ("query", "support", "support_mask"))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)   # the exporter's notes on specialised axes
        program = torch.export.export(model, example, dynamic_shapes=dynamic)
        tmp = path.with_name(path.name + ".tmp.pt2")
        meta = {SIZE_KEY: str(size), **{k: str(v) for k, v in (metadata or {}).items()}}
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp),
                                                 inductor_configs={"aot_inductor.metadata": meta})
    os.replace(tmp, path)
    return path


def load(path: str | Path):
    """A callable (query, support, support_mask) -> logits over the package, and its metadata.

    The compiled code reads every input as contiguous whatever its strides: a channels-last query
    (what torchvision's resize returns for an image decoded as HWC) gives wrong logits without an
    error, so the callable makes its inputs contiguous (cpp/src/aoti_backend.cpp does the same)."""
    runner = torch._inductor.aoti_load_package(str(path))

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        return runner(*(t.contiguous() for t in inputs))
    return run, runner.get_metadata()
