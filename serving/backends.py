"""Runtime backends behind the service: TensorRT engine, ONNX Runtime, the AOTInductor package, or the
merged PyTorch model.

Every backend offers the same two steps, so a registered support set is encoded once:
  encode(support[B,K,3,S,S], support_mask[B,K,S,S]) -> features (opaque, batchable along B)
  decode(query[B,3,S,S], features) -> logits[B,2,S,S]   (numpy float32)
Features of batch 1 serve every query of a larger batch (``batch_features``): queries against one
registered set travel with its features once, not once per query. At the recipe's sizes a PFENet set
holds 29 MB (layer4 of the support, 2048 x 60 x 60): stacked 8 times per batch, the copy took as long
as the network on an H100.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch

from .model_files import BACKENDS, CHOICES

log = logging.getLogger(__name__)


class Backend:
    name = "base"
    kind = "base"     # the feature format: a support set encoded by one kind is not another's
    cpu_torch = False  # runs on PyTorch's CPU threads: sized per call to the free cores (serving/threads.py)
    files: list = []  # the model files loaded (their sha256 is the model's fingerprint)
    size = 0          # the square input size the model was exported for
    shots = None      # the one shot count a fixed-shot model takes (BAM trained with K > 1), else None
    features = None   # {support feature: its dynamic axes} in encode's order; None: encode keeps the inputs

    def encode(self, support: np.ndarray, mask: np.ndarray):
        raise NotImplementedError

    def decode(self, query: np.ndarray, feats) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def batch_features(feats: list):
        """The features of a batch of queries, one entry per query: one set shared by all (a registered
        set) as it is, for decode to broadcast; different sets stacked along the batch axis."""
        if all(f is feats[0] for f in feats):
            return feats[0]
        return tuple(np.concatenate([f[i] for f in feats], 0) for i in range(len(feats[0])))


def broadcast(feats, batch: int) -> tuple:
    """numpy features of batch 1 repeated to ``batch`` (contiguous, as runtimes read them)."""
    return tuple(np.ascontiguousarray(np.broadcast_to(f, (batch, *f.shape[1:]))) if f.shape[0] != batch else f
                 for f in feats)


class TorchBackend(Backend):
    """The merged PyTorch model. On CUDA, decode replays a CUDA graph per input shape (captured on first
    use, at most ``MAX_GRAPHS``): one launch instead of the network's hundreds, each of which needs
    Python's lock, which the service's image threads hold much of the time (on an H100 at 473 px a
    batch took twice as long in the service as alone without graphs)."""
    name = kind = "torch"
    MAX_GRAPHS = 32

    def __init__(self, model_dir: Path, device: str = "auto", cuda_graphs: bool = True):
        from pipeline.adapter import load_merged
        self.model, self.cfg = load_merged(model_dir / "merged.pt")
        self.files = [model_dir / "merged.pt"]
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.model.to(self.device).eval()
        self.cpu_torch = self.device.type == "cpu"
        self.size = self.cfg.eval.test_size
        from pipeline.models import fixed_shots
        self.shots = fixed_shots(self.model)
        self.features = {n: {i: a for i, a in axes.items() if not (a == "shots" and self.shots)}
                         for n, axes in self.model.SUPPORT_FEATURES.items()}
        self.graphs = {} if cuda_graphs and self.device.type == "cuda" else None
        self.pool = None                 # one memory pool for every graph: replays never overlap
        self.lock = threading.Lock()     # one replay at a time: a graph's input buffers are shared

    @torch.no_grad()
    def encode(self, support, mask):
        feats = self.model.encode_support(torch.from_numpy(support).to(self.device), torch.from_numpy(mask).to(self.device))
        return tuple(f.cpu().numpy() for f in feats)

    def _run(self, query, feats):
        """The decoder on device tensors; features of batch 1 expanded to the queries' batch on the device."""
        return self.model.decode(query, *(f.expand(query.shape[0], *f.shape[1:]).contiguous()
                                          if f.shape[0] != query.shape[0] else f for f in feats))

    def _eager(self, query: np.ndarray, feats) -> np.ndarray:
        return self._run(torch.from_numpy(query).to(self.device),
                         [torch.from_numpy(f).to(self.device) for f in feats]).float().cpu().numpy()

    def _capture(self, query: np.ndarray, feats) -> dict:
        """Static input buffers, the graph and its output for these shapes (warmed up on a side stream
        first, as capture requires)."""
        g = {"query": torch.from_numpy(query).to(self.device),
             "feats": [torch.from_numpy(f).to(self.device) for f in feats], "graph": torch.cuda.CUDAGraph()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(g["query"], g["feats"])
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(g["graph"], pool=self.pool):
            g["out"] = self._run(g["query"], g["feats"])
        return g

    @torch.no_grad()
    def decode(self, query, feats):
        if self.graphs is None:
            return self._eager(query, feats)
        key = (query.shape, tuple(f.shape for f in feats))
        with self.lock:
            g = self.graphs.get(key)
            if g is None:
                if len(self.graphs) >= self.MAX_GRAPHS:     # shapes beyond the cap run eagerly
                    return self._eager(query, feats)
                try:
                    g = self.graphs[key] = self._capture(query, feats)
                except Exception as e:    # an operator that cannot be captured: eager from now on
                    log.warning("CUDA graph capture failed (%s: %s); decoding without graphs", type(e).__name__, e)
                    self.graphs = None
                    return self._eager(query, feats)
            g["query"].copy_(torch.from_numpy(query))
            for buf, f in zip(g["feats"], feats):
                buf.copy_(torch.from_numpy(f))
            g["graph"].replay()
            return g["out"].float().cpu().numpy()


class OnnxBackend(Backend):
    name = kind = "onnxruntime"

    def __init__(self, model_dir: Path, threads: int | None = None):
        from export.onnx_export import SplitSession
        enc, dec = model_dir / "support_encoder.onnx", model_dir / "query_decoder.onnx"
        for f in (enc, dec):
            if not f.exists():
                raise FileNotFoundError(f"{f} is missing; run the export stage (`dvc repro export`) first")
        self.sess = SplitSession(enc, dec, threads=threads, spin=False)   # the CPU is shared with image work
        self.files = [enc, dec]
        from export.onnx_export import read_metadata
        self.size = int(read_metadata(dec)["input_size"][0])
        k = self.sess.enc.get_inputs()[0].shape[1]    # the support's shots axis: a name when dynamic
        self.shots = k if isinstance(k, int) else None
        self.features = {o.name: {i: d for i, d in enumerate(o.shape) if not isinstance(d, int)}
                         for o in self.sess.enc.get_outputs()}
        self.name = f"onnxruntime ({self.sess.get_providers()[0]})"

    def encode(self, support, mask):
        return tuple(self.sess.encode(support, mask))

    def decode(self, query, feats):
        return self.sess.decode(query, *broadcast(feats, query.shape[0]))


class OpenVINOBackend(OnnxBackend):
    """The same split ONNX graphs compiled by OpenVINO for the CPU (export/openvino_session.py). Its features are
    its own kind: a set encoded here is not reused by ONNX Runtime."""
    name = kind = "openvino"

    def __init__(self, model_dir: Path, threads: int | None = None, int8: bool = False):
        from export.onnx_export import read_metadata
        from export.openvino_session import OpenVINOSplit
        enc, dec = model_dir / "support_encoder.onnx", model_dir / ("int8/query_decoder.onnx" if int8 else
                                                                  "query_decoder.onnx")
        for f in (enc, dec):
            if not f.exists():
                raise FileNotFoundError(f"{f} is missing; run the export stage (`dvc repro export`"
                                        f"{' with export.int8: true' if int8 else ''}) first")
        if torch.cuda.is_available():
            raise RuntimeError("a CUDA device is here: TensorRT or ONNX Runtime's CUDA provider serve it")
        from export.int8 import PRECISION_KEY
        from export.openvino_session import bf16_capable
        meta = read_metadata(dec)
        # bfloat16 for the encoder and the INT8 decoder's other layers only where the export measured it so within
        # int8_max_drop
        precision = "bf16" if int8 and meta.get(PRECISION_KEY) == "bf16" and bf16_capable() else "f32"
        self.sess = OpenVINOSplit(enc, dec, threads, precision)
        self.files = [enc, dec]
        self.size = int(meta["input_size"][0])
        k = self.sess.enc.inputs[0].get_partial_shape()[1]
        self.shots = k.get_length() if k.is_static else None
        import onnx
        outputs = onnx.load(str(enc), load_external_data=False).graph.output      # the dynamic axes' names
        self.features = {o.name: {i: d.dim_param for i, d in enumerate(o.type.tensor_type.shape.dim) if d.dim_param}
                         for o in outputs}
        self.name = (f"openvino {self.sess.version.split('-')[0]} (CPU{', INT8 decoder' if int8 else ''}"
                     f"{', bfloat16 elsewhere' if precision == 'bf16' else ''})")
        if int8:
            self.kind = "openvino-int8"       # its support features are kept apart from the FP32 backends


def faster_on_cpu(model_dir: Path, candidates: list[Backend]) -> Backend:
    """Of backends that load on a CPU, the one that decodes a query at the model's size fastest (one warm-up, then
    the best of two): OpenVINO is faster than ONNX Runtime on the ResNet-50 at 473 px, not on every model."""
    import time
    if len(candidates) == 1:
        return candidates[0]
    times = {}
    for b in candidates:
        k = b.shots or 1
        s = np.zeros((1, k, 3, b.size, b.size), np.float32)
        m = np.zeros((1, k, b.size, b.size), np.float32)
        m[..., : b.size // 2, :] = 1
        feats = b.encode(s, m)
        q = np.zeros((1, 3, b.size, b.size), np.float32)
        b.decode(q, feats)
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            b.decode(q, feats)
            best = min(best, time.perf_counter() - t0)
        times[b] = best
    pick = min(times, key=times.get)
    log.info("backend auto on the CPU: %s", ", ".join(f"{b.name} {t * 1000:.0f} ms a query" for b, t in times.items()))
    return pick


class TensorRTBackend(Backend):
    """The full-graph engine: a registered support set keeps its preprocessed tensors (the engine
    recomputes its features per query, as one engine holds the whole network)."""
    name = kind = "tensorrt"

    def __init__(self, model_dir: Path):
        from export.tensorrt_engine import TRTRunner
        self.runner = TRTRunner(model_dir / "model.engine")
        self.files = [model_dir / "model.engine"]
        self.size = int(self.runner.meta["size"])

    def encode(self, support, mask):
        return support, mask

    def decode(self, query, feats):
        support, mask = broadcast(feats, query.shape[0])
        return self.runner(torch.from_numpy(query), torch.from_numpy(support), torch.from_numpy(mask)).cpu().numpy()


class AotiBackend(Backend):
    """The AOTInductor package (export/aoti.py), the model C++ loads: masks equal to cpp/'s bit for bit.
    Like the TensorRT engine it holds the whole network, so a registered set keeps its tensors."""
    name = kind = "aoti"

    def __init__(self, model_dir: Path):
        from export.aoti import SIZE_KEY, load
        path = model_dir / "aoti" / "model.pt2"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; it is written by the export stage when export.aoti is true")
        self.runner, meta = load(path)
        self.files = [path]
        self.size = int(meta[SIZE_KEY])
        self.name = f"aoti ({meta.get('AOTI_DEVICE_KEY', 'cpu')})"
        self.cpu_torch = meta.get("AOTI_DEVICE_KEY", "cpu") == "cpu"

    def encode(self, support, mask):
        return support, mask

    @torch.no_grad()
    def decode(self, query, feats):
        support, mask = (torch.from_numpy(f) for f in broadcast(feats, query.shape[0]))
        return self.runner(torch.from_numpy(query), support, mask).cpu().numpy()


def load_backend(model_dir: str | Path, name: str = "auto") -> Backend:
    """The named backend, or with ``auto`` the best that loads: TensorRT, then ONNX Runtime, then PyTorch."""
    model_dir = Path(model_dir)
    if name not in ("auto",) + CHOICES:
        raise ValueError(f"unknown backend {name!r}; choose auto or one of {CHOICES}")
    makers = {"tensorrt": TensorRTBackend, "openvino": OpenVINOBackend, "onnxruntime": OnnxBackend,
              "aoti": AotiBackend, "torch": TorchBackend,
              "openvino-int8": lambda d: OpenVINOBackend(d, int8=True)}
    if name != "auto":
        return makers[name](model_dir)
    errors, cpu = [], []
    for n in BACKENDS:
        try:
            b = makers[n](model_dir)
        except Exception as e:   # try the next one, say why
            errors.append(f"{n}: {e}")
            log.info("backend %s unavailable: %s", n, e)
            continue
        if n == "openvino":      # a CPU runtime: kept if it beats ONNX Runtime's CPU provider here
            cpu.append(b)
            continue
        if n == "onnxruntime" and cpu and "CPU" in b.name:
            b = faster_on_cpu(model_dir, [*cpu, b])
        log.info("backend: %s", b.name)
        return b
    if cpu:
        log.info("backend: %s", cpu[0].name)
        return cpu[0]
    raise RuntimeError("no backend could be loaded: " + "; ".join(errors))
