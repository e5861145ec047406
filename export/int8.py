"""INT8 for the CPU: the query decoder quantized statically, with its accuracy cost measured before it is kept.

Post-training static quantization in ONNX Runtime's QDQ form (INT8 weights per output channel, INT8
activations, calibrated on the decoder's own inputs: training episodes of the benchmark the model was trained
on, encoded by the FP32 support encoder). The QDQ file runs in ONNX Runtime and in OpenVINO; OpenVINO runs it
fastest here (benchmarks/cpu_latency.py: at 97 px on the 2-core AMD EPYC with AVX-512 VNNI, 3.6x ONNX Runtime
FP32 per query against 1.9x for ONNX Runtime INT8; NNCF's INT8 for OpenVINO was as fast at 473 px, 281 against
290 ms, and needs a further package), so the accuracy is measured through OpenVINO where it is installed. The
support encoder stays FP32 (bfloat16 in the option below): a set is encoded once and reused by every query.

The export stage (``export.int8: true``) writes ``int8/query_decoder.onnx`` beside the FP32 graphs and scores
FP32 and INT8 on the same evaluation episodes; above ``export.int8_max_drop`` mIoU points the file is kept as
``int8/query_decoder.rejected.onnx`` and no backend loads it. On a CPU with native bfloat16 the INT8 decoder is
also scored with OpenVINO running everything else (the support encoder, the decoder's unquantized layers) in
bfloat16: 1.28x faster again at 473 px, 1.44x at 641 px on the PFENet ResNet-50 (benchmarks/cpu_latency.py).
Within the same limit the file says so (``PRECISION_KEY``) and the ``openvino-int8`` backend runs it that way
on such a CPU.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FILE = Path("int8") / "query_decoder.onnx"
PRECISION_KEY = "openvino_precision"    # in the INT8 file's metadata: bf16 where its accuracy was measured so
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


def split_runtime(encoder: Path, decoder: Path, threads: int | None = None, precision: str = "f32"):
    """OpenVINO over the graphs where it is installed (what serves INT8 fastest here), else ONNX Runtime."""
    from .openvino_session import OpenVINOSplit, available
    if available():
        return OpenVINOSplit(encoder, decoder, threads, precision)
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
    whose decision (object or not) both take alike (over the first 50 episodes: the predictions are kept); on a
    CPU with native bfloat16, the same for INT8 with everything else in bfloat16 (``bf16``)."""
    from pipeline.evaluate import evaluate

    from .openvino_session import bf16_capable
    runs = [("fp32", fp32, "f32"), ("int8", int8, "f32")] + ([("bf16", int8, "bf16")] if bf16_capable() else [])
    scores, preds = {}, {}
    for name, dec, precision in runs:
        acc, kept = evaluate(AsModel(split_runtime(encoder, dec, precision=precision)), dataset, torch.device("cpu"),
                             desc=f"int8 check {name}", progress=False, keep=min(50, len(dataset)), classes=classes)
        scores[name] = 100 * acc.miou()
        preds[name] = [k["pred"] for k in kept]

    def agreement(name):
        same = sum(int((a == b).sum()) for a, b in zip(preds["fp32"], preds[name]))
        return round(same / max(sum(a.numel() for a in preds["fp32"]), 1), 5)
    out = {"fp32_miou": round(scores["fp32"], 2), "int8_miou": round(scores["int8"], 2),
           "drop": round(scores["fp32"] - scores["int8"], 2), "argmax_agreement": agreement("int8"),
           "episodes": len(dataset), "agreement_episodes": len(preds["fp32"])}
    out["bf16"] = ({"miou": round(scores["bf16"], 2), "drop": round(scores["fp32"] - scores["bf16"], 2),
                    "argmax_agreement": agreement("bf16")} if "bf16" in scores
                   else {"measured": False, "reason": "this CPU has no native bfloat16 (or OpenVINO is not installed)"})
    return out


def allow_bf16(path: Path) -> None:
    """Record in the INT8 file that its accuracy was measured, and kept, with bfloat16 everywhere else."""
    import onnx
    proto = onnx.load(str(path), load_external_data=False)       # weights stored beside it stay where they are
    kept = [p for p in proto.metadata_props if p.key != PRECISION_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = PRECISION_KEY, "bf16"
    tmp = path.with_name(path.name + ".tmp")
    try:
        onnx.save(proto, str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
