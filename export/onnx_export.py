"""Merged PyTorch model -> ONNX, with metadata, checker, and parity through ONNX Runtime.

One graph serves every shot count: batch and K are dynamic axes (the prior and the prototypes
are vectorised over shots), the image size is fixed (the pyramid bins depend on it) and recorded
in the metadata. A BAM model trained with K > 1 shots takes exactly K (its k-shot reweighting has K
inputs): its graphs fix that axis. The split graphs carry the head's support features by the names
its ``SUPPORT_FEATURES`` gives (PFENet: prototype, support_feat4; BAM: + support_gram).
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

log = logging.getLogger(__name__)
INPUTS = ("query", "support", "support_mask")
# export.exporter. dynamo (torch.export): 11.2 s for a 48 px resnet10_slim PFENet on the 2-core
# CPU; torchscript (the tracing exporter, deprecated by PyTorch but shipped by the pinned 2.14): 0.97 s, the
# same outputs for PFENet (relative error 3.5e-7 through ONNX Runtime at batch 1 and 3, 1 and 5 shots). BAM's
# traced graph is less exact: 1.2e-5 on resnet10_slim, 2.6e-4 on resnet18 (dynamo: 8.5e-8), over the 1e-4
# tolerance, so keep dynamo for BAM. `auto` (the default) picks torchscript for PFENet and the baseline, dynamo
# for BAM, and falls back to dynamo where the traced graph fails its parity check (export_checked). Both
# graphs take the same inputs, outputs, dynamic batch and shots; the parity check runs on either and refuses a
# graph outside export.rtol.
EXPORTERS = ("auto", "dynamo", "torchscript")
OUTPUTS = ("logits",)


class ParityError(RuntimeError):
    pass


class SupportEncoder(torch.nn.Module):
    """support[B,K,3,S,S], support_mask[B,K,S,S] -> the head's support features."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, support, support_mask):
        return self.model.encode_support(support, support_mask)


class QueryDecoder(torch.nn.Module):
    """query[B,3,S,S], *support features -> logits[B,2,S,S]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, query, *features):
        return self.model.decode(query, *features)


def _dynamic_axes(dynamic, names_in, names_out, out_axes) -> dict:
    """torch.export's dynamic_shapes ({name: {axis: Dim}}, or [query axes, (feature axes, ...)]) as the
    TorchScript exporter's dynamic_axes ({name: {axis: dim name}}), outputs included."""
    per_input = [dynamic[n] for n in names_in] if isinstance(dynamic, dict) else [dynamic[0], *dynamic[1]]
    named = dict(zip(names_in, per_input))
    named.update(zip(names_out, out_axes))
    return {n: {axis: dim.__name__ for axis, dim in axes.items()} for n, axes in named.items() if axes}


def pick_exporter(exporter: str, model) -> str:
    """export.exporter as run: ``auto`` is dynamo for BAM (its traced graph misses the tolerance), else torchscript."""
    if exporter not in EXPORTERS:
        raise ValueError(f"export.exporter: {exporter!r} is not one of {list(EXPORTERS)}")
    if exporter != "auto":
        return exporter
    from pipeline.models.bam import BAM
    return "dynamo" if isinstance(model, BAM) else "torchscript"


def _export(module, example, dynamic, names_in, names_out, path: Path, opset: int, metadata: dict | None,
            exporter: str = "dynamo", out_axes=()) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with torch.no_grad(), warnings.catch_warnings():
        # One Dim object names the batch (and the shots) of every input on purpose: they are the same
        # axis. The exporter warns once per extra input that it keeps the first one's name; that is
        # the intent, so the warning is silenced here and nowhere else.
        warnings.filterwarnings("ignore", message=r"# The axis name: \w+ will not be used", category=UserWarning)
        if exporter == "torchscript":      # EXPORTERS: the same graph contract, traced in a second
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)   # sizes are fixed per export
            torch.onnx.export(module.eval(), example, str(tmp), dynamo=False, input_names=list(names_in),
                              output_names=list(names_out), opset_version=opset,
                              dynamic_axes=_dynamic_axes(dynamic, names_in, names_out, out_axes))
        elif exporter == "dynamo":
            torch.onnx.export(module.eval(), example, str(tmp), dynamo=True, dynamic_shapes=dynamic,
                              input_names=list(names_in), output_names=list(names_out), opset_version=opset,
                              external_data=False, verbose=False)
        else:
            raise ValueError(f"export.exporter: {exporter!r} is not one of {list(EXPORTERS)}")
    proto = onnx.load(str(tmp))
    if exporter == "torchscript":        # the tracer leaves the outputs' fixed sizes symbolic: state them
        with torch.no_grad():
            outs = module(*example)
        axes = _dynamic_axes(dynamic, names_in, names_out, out_axes)
        for value, t in zip(proto.graph.output, outs if isinstance(outs, (tuple, list)) else (outs,)):
            for i, (d, n) in enumerate(zip(value.type.tensor_type.shape.dim, t.shape)):
                d.Clear()
                if i in axes.get(value.name, {}):
                    d.dim_param = axes[value.name][i]
                else:
                    d.dim_value = n
    onnx.checker.check_model(proto, full_check=True)
    for k, v in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v if isinstance(v, str) else json.dumps(v)
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return path


def _example(size: int, shots: int = 3):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, size, size, generator=g), torch.randn(2, shots, 3, size, size, generator=g),
            (torch.rand(2, shots, size, size, generator=g) > 0.5).float())


def _dims(model):
    """{"batch": Dim, "shots": Dim or None (fixed)} and the example's shot count."""
    from pipeline.models import fixed_shots
    k = fixed_shots(model)
    return ({"batch": torch.export.Dim("batch", min=1, max=1024),
             "shots": None if k else torch.export.Dim("shots", min=1, max=64)}, k or 3)


def _axes(spec: dict, dims: dict) -> dict:
    return {axis: dims[name] for axis, name in spec.items() if dims[name] is not None}


IMAGE_AXES = {"query": {0: "batch"}, "support": {0: "batch", 1: "shots"}, "support_mask": {0: "batch", 1: "shots"}}


def export_onnx(model: torch.nn.Module, path: str | Path, size: int, opset: int = 18,
                metadata: dict | None = None, exporter: str = "auto") -> Path:
    """Export ``model`` (eval mode; the 3-input few-shot signature) to ``path``; checked by onnx.checker."""
    exporter = pick_exporter(exporter, model)
    dims, k = _dims(model)
    dynamic = {n: _axes(a, dims) for n, a in IMAGE_AXES.items()}
    return _export(model.eval(), _example(size, k), dynamic, INPUTS, OUTPUTS, Path(path), opset, metadata,
                   exporter, [{0: dims["batch"]}])


def export_split(model: torch.nn.Module, out_dir: str | Path, size: int, opset: int = 18,
                 metadata: dict | None = None, exporter: str = "auto") -> tuple[Path, Path]:
    """The same network as two graphs, so a server computes a support set's features once:
    ``support_encoder.onnx`` and ``query_decoder.onnx`` (batch and shots dynamic in both)."""
    out_dir = Path(out_dir)
    exporter = pick_exporter(exporter, model)
    dims, k = _dims(model)
    q, s, m = _example(size, k)
    feats = model.SUPPORT_FEATURES
    feat_axes = [_axes(a, dims) for a in feats.values()]
    enc = _export(SupportEncoder(model), (s, m), {n: _axes(IMAGE_AXES[n], dims) for n in ("support", "support_mask")},
                  ("support", "support_mask"), tuple(feats), out_dir / "support_encoder.onnx", opset, metadata,
                  exporter, feat_axes)
    with torch.no_grad():
        encoded = model.eval().encode_support(s, m)
    dynamic = [_axes(IMAGE_AXES["query"], dims), tuple(feat_axes)]   # (query, *features)
    dec = _export(QueryDecoder(model), (q, *encoded), dynamic, ("query", *feats), ("logits",),
                  out_dir / "query_decoder.onnx", opset, metadata, exporter, [{0: dims["batch"]}])
    return enc, dec


def read_metadata(path: str | Path) -> dict:
    proto = onnx.load(str(path), load_external_data=False)
    out = {}
    for p in proto.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


def providers(prefer_cuda: bool = True) -> list[str]:
    import onnxruntime as ort
    avail = ort.get_available_providers()
    chosen = []
    if prefer_cuda and "CUDAExecutionProvider" in avail and torch.cuda.is_available():
        chosen.append("CUDAExecutionProvider")
    chosen.append("CPUExecutionProvider")
    return chosen


def session(path: str | Path, prefer_cuda: bool = True, threads: int | None = None, spin: bool = True):
    """``spin=False``: idle intra-op threads sleep instead of spinning, which leaves the CPU to the rest
    of a process that does more than inference (the service's image work)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers(prefer_cuda))


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b.astype(np.float64)) /
                 max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def check_parity(model: torch.nn.Module, sess, episodes: list[tuple], rtol: float, fail_dir: str | Path | None = None,
                 label: str = "onnx") -> dict:
    """Compare ``model`` and an ONNX Runtime session on episodes (query, support, mask) tensors.

    Relative error = ||a - b|| / ||b|| over the logits of each episode. Beyond ``rtol`` the inputs
    are kept in ``fail_dir/<label>_parity_failure.npz`` and ParityError is raised.
    """
    worst_rel, worst_abs, rows = 0.0, 0.0, []
    model.eval()
    for i, (q, s, m) in enumerate(episodes):
        with torch.no_grad():
            ref = model(q, s, m).numpy()
        got = sess.run(None, {"query": q.numpy(), "support": s.numpy(), "support_mask": m.numpy()})[0]
        rel, ab = rel_error(got, ref), float(np.abs(got - ref).max())
        rows.append({"batch": int(q.shape[0]), "shots": int(s.shape[1]), "rel": rel, "max_abs": ab})
        worst_rel, worst_abs = max(worst_rel, rel), max(worst_abs, ab)
        if rel > rtol:
            where = ""
            if fail_dir is not None:
                f = Path(fail_dir) / f"{label}_parity_failure.npz"
                f.parent.mkdir(parents=True, exist_ok=True)
                np.savez(f, query=q.numpy(), support=s.numpy(), support_mask=m.numpy(), expected=ref, got=got)
                where = f"; inputs and both outputs kept in {f}"
            raise ParityError(f"{label} parity failed on episode {i} (batch {q.shape[0]}, {s.shape[1]} shots): "
                              f"relative error {rel:.3g} > tolerance {rtol:g}, max abs {ab:.3g}{where}")
    return {"max_rel": worst_rel, "max_abs": worst_abs, "rtol": rtol, "episodes": rows}


def latency(fn, runs: int = 10, warmup: int = 3, sync=None) -> dict:
    """Median and minimum wall time of ``fn`` after ``warmup`` calls, and whether the machine was busy.

    ``cpu_per_wall`` is the CPU time this process got per second of wall time while it was timed;
    below 0.7 the work waited for a core (another process held the machine), and ``busy`` says so:
    such a figure measures the machine's load, not the model.
    """
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    ts = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        ts.append(time.perf_counter() - t)
    cpu_per_wall = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    ts.sort()
    return {"median_ms": 1000 * ts[len(ts) // 2], "min_ms": 1000 * ts[0], "runs": runs, "warmup": warmup,
            "cpu_per_wall": round(cpu_per_wall, 3), "loadavg_1m": round(load, 2),
            "busy": bool(sync is None and cpu_per_wall < 0.7)}


class SplitSession:
    """ONNX Runtime over the split graphs; ``run`` keeps the full graph's 3-input signature."""

    def __init__(self, encoder: str | Path, decoder: str | Path, prefer_cuda: bool = True, threads: int | None = None,
                 spin: bool = True):
        self.enc = session(encoder, prefer_cuda, threads, spin)
        self.dec = session(decoder, prefer_cuda, threads, spin)
        self.features = [o.name for o in self.enc.get_outputs()]    # the decoder's inputs after the query

    def encode(self, support: np.ndarray, support_mask: np.ndarray):
        return self.enc.run(None, {"support": support, "support_mask": support_mask})

    def decode(self, query: np.ndarray, *features: np.ndarray) -> np.ndarray:
        return self.dec.run(None, {"query": query, **dict(zip(self.features, features))})[0]

    def run(self, _names, feed: dict):
        return [self.decode(feed["query"], *self.encode(feed["support"], feed["support_mask"]))]

    def get_providers(self):
        return self.dec.get_providers()


def export_checked(model, out_dir: str | Path, size: int, opset: int, metadata: dict | None, exporter: str,
                   batches, rtol: float) -> dict:
    """model.onnx and the split graphs in ``out_dir``, each checked against ``model`` on ``batches`` (ONNX
    Runtime). With ``auto``, a traced graph that fails or misses ``rtol`` is exported again by dynamo: the
    tracer mistranslates PFENet's pyramid where a bin does not divide the feature size (bins 60/30/15/8 of
    an 8x8 map: a wrong Reshape, or an error of 2e-3 for bin 7)."""
    out_dir = Path(out_dir)
    chosen = pick_exporter(exporter, model)

    def run(name: str) -> dict:
        path = export_onnx(model, out_dir / "model.onnx", size, opset, metadata, name)
        sess = session(path)
        parity = check_parity(model, sess, batches, rtol, fail_dir=out_dir, label="onnx")
        enc, dec = export_split(model, out_dir, size, opset, metadata, name)
        split = check_parity(model, SplitSession(enc, dec), batches, rtol, fail_dir=out_dir, label="onnx_split")
        out = {"exporter": name, "path": path, "session": sess, "parity": parity, "encoder": enc, "decoder": dec,
               "split_parity": split}
        from .openvino_session import OpenVINOSplit, available
        if available():             # the same split graphs through OpenVINO (serving's CPU backend), same check
            out["openvino_parity"] = check_parity(model, OpenVINOSplit(enc, dec), batches, rtol, fail_dir=out_dir,
                                                  label="openvino")
        return out
    try:
        return run(chosen)
    except Exception as e:      # ParityError, or ONNX Runtime refusing the traced graph
        if exporter != "auto" or chosen == "dynamo":
            raise
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        log.warning("export.exporter auto: the traced graph failed its check (%s); exporting with dynamo", reason)
        return {**run("dynamo"), "fallback": f"torchscript failed its check: {reason}"}
