"""Measure the two SVF forward forms and the cost of not merging, in one run.

Prints, for the chosen device(s):
  * training step (forward + backward + SGD step on S) of the backbone in the `svf` regime,
    `rebuild` form vs `factorised` form;
  * inference of the whole PFENet model: unmerged SVF (each form) vs merged dense convs.

    python benchmarks/svf_forms.py [--arch resnet50] [--size 128] [--batch 4] [--iters 5]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from pipeline.config import load_config
from pipeline.models import build_model
from pipeline.svf import SVFConv2d, merge_svf


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, iters, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def set_form(model, form):
    for m in model.modules():
        if isinstance(m, SVFConv2d):
            m.form = form


def run(device_name, args):
    device = torch.device(device_name)
    cfg = load_config({"model": {"backbone": args.arch, "pretrained": "random", "finetune": "svf",
                                 "bins": [1.0, 0.5, 0.25, 0.125]}})
    model, counts = build_model(cfg)
    model.to(device)
    bb = model.backbone
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    sup = torch.randn(args.batch, 1, 3, args.size, args.size, device=device)
    mask = (torch.rand(args.batch, 1, args.size, args.size, device=device) > 0.5).float()
    opt = torch.optim.SGD([p for p in bb.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)
    with torch.no_grad():
        stem = bb.layer1(bb.layer0(x))

    def train_step():
        opt.zero_grad(set_to_none=True)
        bb.layer4(bb.layer3(bb.layer2(stem))).float().square().mean().backward()
        opt.step()

    rows = {}
    bb.train()
    for form in ("rebuild", "factorised"):
        set_form(model, form)
        rows[f"train step, {form}"] = timeit(train_step, device, args.iters)
    model.eval()
    with torch.no_grad():
        for form in ("rebuild", "factorised"):
            set_form(model, form)
            rows[f"inference, unmerged ({form})"] = timeit(lambda: model(x, sup, mask), device, args.iters)
        merged = merge_svf(copy.deepcopy(model)).eval()
        rows["inference, merged"] = timeit(lambda: merged(x, sup, mask), device, args.iters)

    print(f"\n== {device_name}: {args.arch}, batch {args.batch}, {args.size}x{args.size}, "
          f"median of {args.iters}; trainable backbone params in svf: {counts['trainable']:,}")
    for name, t in rows.items():
        print(f"  {name:38s} {t * 1000:9.1f} ms")
    tr = rows["train step, factorised"] / rows["train step, rebuild"]
    print(f"  ratio train step factorised / rebuild          : {tr:.2f}x")
    print(f"  ratio inference unmerged(rebuild) / merged     : "
          f"{rows['inference, unmerged (rebuild)'] / rows['inference, merged']:.2f}x")
    print(f"  ratio inference unmerged(factorised) / merged  : "
          f"{rows['inference, unmerged (factorised)'] / rows['inference, merged']:.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    args = ap.parse_args()
    torch.manual_seed(0)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    for d in devices:
        if d == "cuda" and not torch.cuda.is_available():
            print("\n== cuda: skipped (no CUDA device on this machine)")
            continue
        run(d, args)


if __name__ == "__main__":
    main()
