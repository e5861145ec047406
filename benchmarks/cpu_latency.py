"""CPU latency of a real-size model through every CPU path the service offers, ratios measured in one run
(`--device cuda`: PyTorch and ONNX Runtime's CUDA provider on a GPU, the same table).

    .venv/bin/python benchmarks/cpu_latency.py --head pfenet --backbone resnet50_deep --size 473 --threads 2 [--runs 3]

The model is the head's paper preset (pascal_<head>_frozen, `_vgg` for VGG-16) at random weights (latency does
not depend on them), merged and exported to the project's split graphs once (cached under --cache). Each backend
runs in a process of its own (its peak memory is its own): PyTorch (the merged model), ONNX Runtime FP32, OpenVINO
FP32 and BF16 (on a CPU with AVX-512 BF16), and INT8: the decoder quantized statically (ONNX Runtime's QDQ, per
channel, calibrated on random inputs: latency only, the accuracy cost is the export's `export.int8` measure) run by
ONNX Runtime and by OpenVINO (f32 for its other layers, and bf16: what the service's openvino-int8 runs on a
CPU with native bfloat16 once the export's accuracy check of it passed). `--backends ... openvino-nncf-int8`
adds NNCF's INT8 of the decoder (with `pip install nncf`, not in the lock), the alternative to the QDQ file;
`--backends ... aoti` the AOTInductor package (the whole network, compiled with g++ once, minutes; not in the
default list). At 641 px (COCO-20i's size) the model is the COCO preset. Per backend: the encoding of a
support set (1 shot), a query decoded against the cached set at batch 1 and 8 (per query), and the peak
resident memory. The last line names the fastest path per
query at batch 1: `best: <backend> <r>x vs onnxruntime fp32`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BACKENDS = ("torch", "onnxruntime", "openvino", "openvino-bf16", "onnxruntime-int8", "openvino-int8",
            "openvino-int8-bf16")
COMPILED = ("aoti",)     # chosen by name only: minutes of g++ before the first figure
OPTIONAL = ("openvino-nncf-int8",)   # chosen by name only: NNCF is not in the lock


def export(head: str, backbone: str, size: int, cache: Path) -> Path:
    """merged.pt and the split graphs of the head's preset at random weights, made once."""
    d = cache / f"{preset_of(head, backbone, size)}-{size}"
    if (d / "done.json").exists():
        return d
    from export import onnx_export
    from pipeline import adapter as adapter_io
    from stages.released import random_episodes
    model, cfg, preset = build(head, backbone, size)
    d.mkdir(parents=True, exist_ok=True)
    adapter_io.save(adapter_io.merged_state(model, cfg), d / "merged.pt")
    t0 = time.perf_counter()
    graphs = onnx_export.export_checked(model, d, size, 18, {"input_size": [size, size]}, "auto",
                                        random_episodes(size, [1], 1), 1e-3)
    (d / "done.json").write_text(json.dumps({"preset": preset, "exporter": graphs["exporter"],
                                             "export_seconds": round(time.perf_counter() - t0, 1)}))
    return d


def preset_of(head: str, backbone: str, size: int) -> str:
    return f"{'coco' if size >= 641 else 'pascal'}_{head}_frozen" + ("_vgg" if backbone == "vgg16_bn" else "")


def build(head: str, backbone: str, size: int):
    """(model, config, preset name): the head's PASCAL preset, COCO's at 641 px, at random weights (seed 0)."""
    import torch

    from pipeline.models import build_model
    from stages.released import preset_config
    preset = preset_of(head, backbone, size)
    cfg = preset_config(preset, {"pfenet": "pfenet", "bam": "bam", "baseline": "svf"}[head], 0)
    cfg.model.pretrained, cfg.model.backbone, cfg.eval.test_size = "none", backbone, size   # PyTorch's size too
    torch.manual_seed(0)
    model, _ = build_model(cfg, finetune="frozen", base={"classes": 61 if size >= 641 else 16} if head == "bam"
                           else None, shots=1)
    return model.eval(), cfg, preset


def compile_aoti(d: Path, size: int) -> None:
    """aoti/model.pt2 (export/aoti.py) of the cached merged.pt, compiled once; prints how long g++ took."""
    if (d / "aoti" / "model.pt2").exists():
        return
    from export.aoti import export_aoti
    from pipeline.adapter import load_merged
    t0 = time.perf_counter()
    export_aoti(load_merged(d / "merged.pt")[0], d / "aoti" / "model.pt2", size)
    print(f"AOTInductor package compiled in {time.perf_counter() - t0:.0f} s", flush=True)


def calibration(d: Path) -> list[dict]:
    """The decoder's inputs of 4 random episodes (the FP32 encoder's features): latency needs no real images."""
    import torch

    from export import int8
    from export.onnx_export import SplitSession
    from stages.released import random_episodes
    enc = SplitSession(d / "support_encoder.onnx", d / "query_decoder.onnx", prefer_cuda=False)
    size = enc.enc.get_inputs()[0].shape[-1]
    episodes = [(q, s, (m > 0).to(torch.float32)) for q, s, m in random_episodes(size, [1], 4)]
    return int8.calibration_feeds(enc, episodes)


def quantize(d: Path) -> Path:
    """query_decoder_int8.onnx: the export's static QDQ INT8 (export/int8.py), calibrated on random episodes."""
    out = d / "query_decoder_int8.onnx"
    if out.exists():
        return out
    from export import int8
    return int8.quantize_decoder(d / "query_decoder.onnx", out, calibration(d))


def quantize_nncf(d: Path) -> Path:
    """query_decoder_nncf.xml: NNCF's post-training INT8 of the same decoder for OpenVINO (its defaults), on the
    same calibration inputs: the alternative to the QDQ file. NNCF is not in the lock (`pip install nncf`)."""
    out = d / "query_decoder_nncf.xml"
    if out.exists():
        return out
    import nncf
    import openvino as ov
    model = ov.Core().read_model(str(d / "query_decoder.onnx"))
    ov.save_model(nncf.quantize(model, nncf.Dataset(calibration(d)), subset_size=4), str(out))
    return out


def worker(name: str, d: Path, threads: int, batches: list[int], runs: int, device: str = "cpu") -> dict:
    """One backend in this process: encode and decode timings (ms, best of ``runs`` after a warm-up), peak RSS."""
    import torch
    torch.set_num_threads(threads)
    if name in ("torch", "aoti"):
        from serving.backends import AotiBackend, TorchBackend
        b = TorchBackend(d, device=device) if name == "torch" else AotiBackend(d)
        enc, dec = b.encode, b.decode      # the package holds the whole network: it encodes the set every query
        size = b.size
    else:
        from export.onnx_export import SplitSession
        from export.openvino_session import OpenVINOSplit
        decoder = d / ("query_decoder_nncf.xml" if "nncf" in name else
                       "query_decoder_int8.onnx" if "int8" in name else "query_decoder.onnx")
        if name.startswith("openvino"):
            s = OpenVINOSplit(d / "support_encoder.onnx", decoder, threads,
                              "bf16" if name.endswith("bf16") else "f32")
        else:
            s = SplitSession(d / "support_encoder.onnx", decoder, prefer_cuda=device == "cuda", threads=threads)
            if device == "cuda" and "CUDAExecutionProvider" not in s.get_providers():
                raise RuntimeError(f"ONNX Runtime has no CUDA provider here ({s.get_providers()})")
        from serving.backends import broadcast
        enc = lambda sup, m: tuple(s.encode(sup, m))                          # noqa: E731
        dec = lambda q, f: s.decode(q, *broadcast(f, q.shape[0]))             # noqa: E731
        import onnx
        size = onnx.load(str(d / "query_decoder.onnx"), load_external_data=False).graph.input[0].type.tensor_type \
            .shape.dim[-1].dim_value
    rng = np.random.default_rng(0)
    sup = rng.standard_normal((1, 1, 3, size, size)).astype(np.float32)
    mask = (rng.random((1, 1, size, size)) > 0.6).astype(np.float32)

    def best(fn):
        fn()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()      # the features the encoder left on the GPU are ready
            times.append(time.perf_counter() - t0)
        return min(times) * 1000

    with torch.no_grad():
        feats = enc(sup, mask)
        out = {"encode_ms": best(lambda: enc(sup, mask)) if name != "aoti" else float("nan")}   # aoti: in the query
        for b in batches:
            q = rng.standard_normal((b, 3, size, size)).astype(np.float32)
            out[f"decode_b{b}_ms_per_query"] = best(lambda: dec(q, feats)) / b
    # VmHWM: this process's peak (ru_maxrss would carry the parent's peak across exec)
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    out["peak_rss_mb"] = int(hwm.split()[1]) / 1024
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head", default="pfenet", choices=("pfenet", "bam", "baseline"))
    ap.add_argument("--backbone", default="resnet50_deep", choices=("resnet50_deep", "vgg16_bn"))
    ap.add_argument("--size", type=int, default=473)
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS + COMPILED + OPTIONAL)
    ap.add_argument("--preview", type=int, default=0, help="also time the backends at this smaller working size "
                    "(export.preview_size), in ratio to ONNX Runtime FP32 at --size")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: PyTorch and ONNX Runtime's CUDA provider on the GPU (ratios to ONNX Runtime CUDA)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "svf-fss" / "cpu_latency"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.dir), args.threads[0], args.batches, args.runs, args.device)))
        return
    if args.device == "cuda" and set(args.backends) - {"torch", "onnxruntime"}:
        other = sorted(set(args.backends) - {"torch", "onnxruntime"})
        ap.error(f"--device cuda times torch and onnxruntime only, not {other}")
    t0 = time.perf_counter()
    dirs = {args.size: export(args.head, args.backbone, args.size, Path(args.cache))}
    if args.preview:
        dirs[args.preview] = export(args.head, args.backbone, args.preview, Path(args.cache))
    for size, d in dirs.items():
        if any("int8" in b and "nncf" not in b for b in args.backends):
            quantize(d)
        if "openvino-nncf-int8" in args.backends:
            quantize_nncf(d)
        if "aoti" in args.backends:
            compile_aoti(d, size)
    made = json.loads((dirs[args.size] / "done.json").read_text())
    print(f"{args.head} on {args.backbone} at {args.size} px ({made['preset']}, random weights; exported by "
          f"{made['exporter']}); {os.cpu_count()} cores; ready in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = {}
    for threads, size, name in [(t, s, n) for t in args.threads for s in dirs for n in args.backends]:
        label = name if size == args.size else f"{name} @{size}"
        r = subprocess.run([sys.executable, __file__, "--worker", name, "--dir", str(dirs[size]), "--threads",
                            str(threads), "--runs", str(args.runs), "--device", args.device,
                            "--batches", *map(str, args.batches)],
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if r.returncode:
            print(f"{label} ({threads} threads) failed: {r.stderr.strip().splitlines()[-1][:300]}", flush=True)
            continue
        rows[(label, threads)] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{label:22s} {threads} threads: " + ", ".join(f"{k} {v:.0f}" for k, v in rows[(label, threads)].items()),
              flush=True)
    key = f"decode_b{args.batches[0]}_ms_per_query"
    print(f"\n| backend | threads | encode a set (ms) | " + " | ".join(f"query, batch {b} (ms)" for b in args.batches)
          + " | vs onnxruntime fp32 | peak RSS (MB) |")
    print("|---|---|---|" + "---|" * len(args.batches) + "---|---|")
    for (name, threads), r in rows.items():
        ref = rows.get(("onnxruntime", threads), {}).get(key)
        ratio = f"{ref / r[key]:.2f}x" if ref else "-"
        encode = "in each query" if np.isnan(r["encode_ms"]) else f"{r['encode_ms']:.0f}"
        print(f"| {name} | {threads} | {encode} | "
              + " | ".join(f"{r[f'decode_b{b}_ms_per_query']:.0f}" for b in args.batches)
              + f" | {ratio} | {r['peak_rss_mb']:.0f} |")
    threads = args.threads[0]
    ref = rows.get(("onnxruntime", threads), {}).get(key)
    if ref:
        best = min((r[key], n) for (n, t), r in rows.items() if t == threads and "@" not in n)
        print(f"best: {best[1]} {ref / best[0]:.2f}x vs onnxruntime fp32{' (cuda)' if args.device == 'cuda' else ''}")
        if args.preview:
            best = min((r[key], n) for (n, t), r in rows.items() if t == threads and "@" in n)
            print(f"best with the preview size: {best[1]} {ref / best[0]:.2f}x vs onnxruntime fp32 at {args.size} px")


if __name__ == "__main__":
    main()
