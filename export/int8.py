"""INT8 for the CPU: the query decoder quantized statically, with its accuracy cost measured before it is kept.

Post-training static quantization in ONNX Runtime's QDQ form (INT8 weights per output channel, INT8
activations, calibrated on the decoder's own inputs: training episodes of the benchmark the model was trained
on, encoded by the FP32 support encoder). The QDQ file runs in ONNX Runtime and in OpenVINO; OpenVINO runs it
fastest here (benchmarks/cpu_latency.py: at 97 px on the 2-core AMD EPYC with AVX-512 VNNI, 3.6x ONNX Runtime
FP32 per query against 1.9x for ONNX Runtime INT8), so the accuracy is measured through OpenVINO where it is
installed. The support encoder stays FP32: a set is encoded once and reused by every query.

The export stage (``export.int8: true``) writes ``int8/query_decoder.onnx`` beside the FP32 graphs and scores
FP32 and INT8 on the same evaluation episodes; above ``export.int8_max_drop`` mIoU points the file is kept as
``int8/query_decoder.rejected.onnx`` and no backend loads it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FILE = Path("int8") / "query_decoder.onnx"
REJECTED = Path("int8") / "query_decoder.rejected.onnx"


def calibration_feeds(encoder_session, batches) -> list[dict]:
    """The decoder's inputs of ``batches`` ((query, support, mask) tensors): the query and the support's features."""
    feeds = []
    for q, s, m in batches:
        feats = encoder_session.encode(s.numpy(), m.numpy())
        feeds.append({"query": q.numpy(), **dict(zip(encoder_session.features, feats))})
    return feeds


def quantize_decoder(decoder: str | Path, out: str | Path, feeds: list[dict]) -> Path:
    """``out``: the decoder in QDQ INT8, calibrated on ``feeds`` (MinMax over every feed)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(decoder), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    pre.unlink()
    return out


def split_runtime(encoder: Path, decoder: Path, threads: int | None = None):
    """OpenVINO over the graphs where it is installed (what serves INT8 fastest here), else ONNX Runtime."""
    from .openvino_session import OpenVINOSplit, available
    if available():
        return OpenVINOSplit(encoder, decoder, threads)
    from .onnx_export import SplitSession
    return SplitSession(encoder, decoder, prefer_cuda=False, threads=threads)


class AsModel:
    """A split runtime as the callable `pipeline.evaluate.evaluate` scores: (query, support, mask) -> logits."""

    def __init__(self, runtime):
        self.runtime = runtime

    def eval(self):
        return self

    def __call__(self, q, s, m):
        feats = self.runtime.encode(s.numpy(), m.numpy())
        return torch.from_numpy(self.runtime.decode(q.numpy(), *feats))


def accuracy(encoder: Path, fp32: Path, int8: Path, dataset, classes: list[int]) -> dict:
    """mIoU (%) of the FP32 and the INT8 decoder on the same episodes, their difference, and the share of pixels
    whose decision (object or not) both take alike (over the first 50 episodes: the predictions are kept)."""
    from pipeline.evaluate import evaluate
    scores, preds = {}, {}
    for name, dec in (("fp32", fp32), ("int8", int8)):
        acc, kept = evaluate(AsModel(split_runtime(encoder, dec)), dataset, torch.device("cpu"), desc=f"int8 check {name}",
                             progress=False, keep=min(50, len(dataset)), classes=classes)
        scores[name] = 100 * acc.miou()
        preds[name] = [k["pred"] for k in kept]
    same = sum(int((a == b).sum()) for a, b in zip(preds["fp32"], preds["int8"]))
    total = sum(a.numel() for a in preds["fp32"])
    return {"fp32_miou": round(scores["fp32"], 2), "int8_miou": round(scores["int8"], 2),
            "drop": round(scores["fp32"] - scores["int8"], 2), "argmax_agreement": round(same / max(total, 1), 5),
            "episodes": len(dataset), "agreement_episodes": len(preds["fp32"])}
