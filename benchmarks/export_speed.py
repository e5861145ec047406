"""Latency and throughput of the deployable forms, measured in one run, printed as ratios.

  unmerged SVF (PyTorch)  vs  merged dense (PyTorch)  vs  ONNX Runtime  vs  TensorRT (where present)

    python benchmarks/export_speed.py [--fold 0] [--model-shots 1] [--batch 1 8] [--shots 1] [--runs 20]

Uses the artifacts of `dvc repro` (adapter.pt, merged.pt, model.onnx, model.engine if built).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export import onnx_export, tensorrt_engine  # noqa: E402
from pipeline import adapter as adapter_io  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--model-shots", type=int, default=1, help="the model trained with this many shots")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d = ROOT / "models" / f"fold{args.fold}" / f"{args.model_shots}shot"
    unmerged, cfg = adapter_io.load_model(d / "adapter.pt")
    merged, _ = adapter_io.load_merged(d / "merged.pt")
    sess = onnx_export.session(d / "model.onnx", threads=args.threads)
    size = cfg.eval.test_size
    reason = tensorrt_engine.unavailable_reason()
    trt = tensorrt_engine.TRTRunner(d / "model.engine") if reason is None and (d / "model.engine").exists() else None
    print(f"fold {args.fold}: {cfg.model.backbone} {cfg.model.finetune} ({cfg.model.svf_form} form), {size}x{size}, "
          f"{args.shots} shot(s), {args.threads} threads, ONNX Runtime providers {sess.get_providers()}, "
          f"TensorRT: {'engine ' + str(d / 'model.engine') if trt else reason or 'no engine built'}")
    for b in args.batch:
        g = torch.Generator().manual_seed(b)
        q = torch.randn(b, 3, size, size, generator=g)
        s = torch.randn(b, args.shots, 3, size, size, generator=g)
        m = (torch.rand(b, args.shots, size, size, generator=g) > 0.5).float()
        feed = {"query": q.numpy(), "support": s.numpy(), "support_mask": m.numpy()}
        rows = {}
        with torch.no_grad():
            rows["PyTorch, unmerged SVF"] = onnx_export.latency(lambda: unmerged(q, s, m), args.runs)
            rows["PyTorch, merged"] = onnx_export.latency(lambda: merged(q, s, m), args.runs)
        rows["ONNX Runtime"] = onnx_export.latency(lambda: sess.run(None, feed), args.runs)
        if trt:
            rows["TensorRT"] = onnx_export.latency(lambda: trt(q, s, m), args.runs, sync=torch.cuda.synchronize)
        base = rows["PyTorch, merged"]["median_ms"]
        print(f"\nbatch {b}:")
        print(f"  {'backend':24s} {'median ms':>10s} {'episodes/s':>11s} {'speed-up vs merged PyTorch':>28s}")
        for name, r in rows.items():
            print(f"  {name:24s} {r['median_ms']:10.1f} {1000 * b / r['median_ms']:11.1f} {base / r['median_ms']:27.2f}x")
        print(f"  merged vs unmerged: {rows['PyTorch, unmerged SVF']['median_ms'] / base:.2f}x faster; "
              f"ONNX Runtime vs merged PyTorch: {base / rows['ONNX Runtime']['median_ms']:.2f}x")


if __name__ == "__main__":
    main()
