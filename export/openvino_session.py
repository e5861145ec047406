"""OpenVINO over the split ONNX graphs (support_encoder.onnx, query_decoder.onnx): the same files and the same
``encode`` / ``decode`` / ``run`` as ONNX Runtime's ``SplitSession``, so the export's parity check and the
service take either.

OpenVINO reads the ONNX files as they are (dynamic batch and shots kept) and compiles them for the CPU with the
latency hint. PFENet on the deep-stem ResNet-50 at 473 px on the 2-core AMD EPYC development machine (AVX-512
with VNNI and BF16): benchmarks/cpu_latency.py and docs/serving.md give the measured ratios to ONNX Runtime.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def bf16_capable() -> bool:
    """This CPU runs bfloat16 natively (AVX-512 BF16 or AMX), as OpenVINO reports it."""
    if not available():
        return False
    import openvino as ov
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OpenVINOSplit:
    """The split graphs compiled by OpenVINO for the CPU; ``threads`` (default: OpenVINO's choice) caps its
    inference threads. ``precision`` f32 (default): on a CPU with AVX-512 BF16 OpenVINO would otherwise run in
    bfloat16 (measured here: relative error 4.4e-3 against ONNX Runtime on a PFENet, where f32 keeps the export's
    1e-4); ``bf16`` is the faster option the benchmark measures."""

    def __init__(self, encoder: str | Path, decoder: str | Path, threads: int | None = None, precision: str = "f32"):
        try:
            import openvino as ov
        except ImportError as e:
            raise RuntimeError("the openvino package is not installed (`make venv` installs it from the lock)") from e
        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision,
                  **({"INFERENCE_NUM_THREADS": int(threads)} if threads else {})}
        self.enc = core.compile_model(core.read_model(str(encoder)), "CPU", config)
        self.dec = core.compile_model(core.read_model(str(decoder)), "CPU", config)
        self.enc_req, self.dec_req = self.enc.create_infer_request(), self.dec.create_infer_request()
        self.features = [o.get_any_name() for o in self.enc.outputs]     # the decoder's inputs after the query
        self.version = ov.get_version()

    def encode(self, support: np.ndarray, support_mask: np.ndarray) -> list[np.ndarray]:
        out = self.enc_req.infer({"support": support, "support_mask": support_mask})
        return [np.array(out[o]) for o in self.enc.outputs]

    def decode(self, query: np.ndarray, *features: np.ndarray) -> np.ndarray:
        out = self.dec_req.infer({"query": query, **dict(zip(self.features, features))})
        return np.array(out[self.dec.output(0)])

    def run(self, _names, feed: dict):
        return [self.decode(feed["query"], *self.encode(feed["support"], feed["support_mask"]))]

    def get_providers(self):
        return ["OpenVINO CPU"]
