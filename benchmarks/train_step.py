"""Time one training step with SVF of the paper's recipe (PFENet, BAM or the baseline head; ResNet-50 or VGG-16),
and what a fold then costs.

A step = forward + backward + SGD step on a batch of episodes (head + S of layer2-4, BN frozen),
for both SVF forward forms and, on CUDA, float32 / AMP bf16 / AMP fp16. Prints step time, peak
memory, and the hours one fold takes for the given epochs and training images. BAM's base learner
(PSPNet over background + 15 base classes) is random here: its weights do not change the cost. The
ResNet's dilation is the presets' (PSPNet's for BAM, torchvision's for PFENet and the baseline); VGG-16 has none.

    python benchmarks/train_step.py [--head pfenet|bam|baseline] [--arch resnet50_deep|vgg16_bn] [--size 473] [--batch 8]
                                    [--shots 1] [--iters 5] [--epochs 200] [--images 4000]
"""
from __future__ import annotations

import argparse
import time

import torch

from pipeline.config import load_config
from pipeline.models import build_model, head_loss, train_inputs
from pipeline.train import make_optimizer

BASE_CLASSES = 16   # PASCAL-5i: background + 15 base classes


def step_time(model, opt, batch: dict, device, dtype, iters: int) -> tuple[float, float]:
    amp = dtype is not None

    def step():
        with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=amp):
            out = model(batch["query"], batch["support"], batch["support_mask"], **train_inputs(model, batch))
            loss = head_loss(model, out, batch)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()                                                   # warm-up (cuDNN autotuning, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


def main():
    ap = argparse.ArgumentParser(prog="python benchmarks/train_step.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head", default="pfenet", choices=("pfenet", "bam", "baseline"))
    ap.add_argument("--arch", default="resnet50_deep")
    ap.add_argument("--size", type=int, default=473)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=200, help="for the per-fold estimate (PASCAL 200, COCO 50)")
    ap.add_argument("--images", type=int, default=4000, help="training images of the fold (one episode each)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    b, k, s = args.batch, args.shots, args.size
    batch = {"query": torch.randn(b, 3, s, s, generator=g), "support": torch.randn(b, k, 3, s, s, generator=g),
             "support_mask": (torch.rand(b, k, s, s, generator=g) > 0.5).float(),
             "query_mask": (torch.rand(b, s, s, generator=g) > 0.5).long(),
             "query_base": torch.randint(0, BASE_CLASSES, (b, s, s), generator=g),
             "base_class": torch.randint(1, BASE_CLASSES, (b,), generator=g)}
    batch = {key: t.to(device) for key, t in batch.items()}
    precisions = [("float32", None)] + ([("AMP bf16", torch.bfloat16), ("AMP fp16", torch.float16)]
                                        if device.type == "cuda" else [])
    steps = args.epochs * (args.images // args.batch)
    print(f"{device} ({torch.cuda.get_device_name() if device.type == 'cuda' else torch.get_num_threads()} "
          f"{'' if device.type == 'cuda' else 'threads'}), {args.head}, {args.arch}, {s}x{s}, batch {b}, {k} shot; "
          f"fold estimate: {args.epochs} epochs x {args.images // args.batch} steps")
    print(f"{'form':<11} {'precision':<9} {'step s':>8} {'peak GiB':>9} {'fold hours':>11}")
    for form in ("rebuild", "factorised"):
        cfg = load_config({"model": {"head": args.head, "backbone": args.arch, "pretrained": "random",
                                     "finetune": "svf", "svf_form": form,
                                     "dilation": "pspnet" if args.head == "bam" else "torchvision"},
                           "train": {"lr": 0.015, "schedule": "constant"}})
        model, _ = build_model(cfg, base={"classes": BASE_CLASSES} if args.head == "bam" else None, shots=k)
        model.to(device).train()
        opt = make_optimizer(model, cfg.train)
        for name, dtype in precisions:
            t, peak = step_time(model, opt, batch, device, dtype, args.iters)
            print(f"{form:<11} {name:<9} {t:>8.3f} {peak:>9.2f} {t * steps / 3600:>11.1f}")
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
