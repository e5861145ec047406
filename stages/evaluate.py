"""DVC stage `evaluate`: episodic 1- and k-shot evaluation over several seeds, at original resolution."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline import adapter as adapter_io
from pipeline import tracking
from pipeline.data.benchmarks import prepared_dir, split_dir
from pipeline.data.episodes import EpisodeDataset, class_names
from pipeline.evaluate import evaluate, figure, spread_text, summarise
from pipeline.train import pick_device
from stages.common import run, setup, write_json

log = logging.getLogger("evaluate")


def main():
    args, cfg = setup(__doc__, fold=True, extra=lambda ap: ap.add_argument(
        "--untrained", action="store_true", help="score the model before training (the baseline); not tracked"))
    out, plots = Path("models") / f"fold{args.fold}", Path("plots") / f"fold{args.fold}"
    if args.untrained:
        from pipeline.models import build_model
        model = build_model(cfg)[0].eval()
        plots = plots / "untrained"
    else:
        model, _ = adapter_io.load_model(out / "adapter.pt", cfg)
    device = pick_device(cfg.eval.device)
    model.to(device)
    prepared = prepared_dir(cfg.data.root, cfg.data.benchmark)
    pairs = split_dir(cfg.data.root, cfg.data.benchmark, args.fold) / "val.jsonl"
    names = class_names(prepared)
    result = {"fold": args.fold, "benchmark": cfg.data.benchmark, "finetune": cfg.model.finetune,
              "episodes_per_seed": cfg.eval.episodes, "seeds": cfg.eval.seeds}
    figures = []
    torch.manual_seed(0)
    for k in cfg.eval.shots:
        accs = []
        for i, seed in enumerate(cfg.eval.seeds):
            ds = EpisodeDataset(prepared, pairs, k, "test", cfg.eval.test_size, seed=seed, episodes=cfg.eval.episodes)
            acc, kept = evaluate(model, ds, device, desc=f"{k}-shot seed {seed}",
                                 keep=cfg.eval.figure_episodes if i == 0 else 0)
            accs.append(acc)
            if kept:
                path = plots / f"episodes_{k}shot.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                figure(kept, path, names, f"fold {args.fold}, {k}-shot, {cfg.model.finetune}")
                figures.append(path)
        s = summarise(accs)
        s["per_class_iou"] = {names[int(c) - 1]: v for c, v in s["per_class_iou"].items()}
        result[f"{k}shot"] = s
        log.info("fold %d %d-shot: %s", args.fold, k, spread_text(s))
    if args.untrained:
        path = write_json(Path("metrics") / "untrained" / f"fold{args.fold}.json", result)
        print(f"evaluate (untrained) fold {args.fold}: " +
              "; ".join(f"{k}-shot mIoU {result[f'{k}shot']['miou']:.2f}" for k in cfg.eval.shots) + f" -> {path}")
        return
    path = write_json(Path("metrics") / f"fold{args.fold}.json", result)
    with tracking.resume_run(cfg, out, "evaluate") as t:
        for k in cfg.eval.shots:
            s = result[f"{k}shot"]
            t.metrics({f"{k}shot_miou": s["miou"], f"{k}shot_miou_std": s["miou_std"], f"{k}shot_fbiou": s["fbiou"]})
        t.artifact(path, "evaluate")
        for f in figures:
            t.artifact(f, "evaluate")
    print(f"evaluate fold {args.fold}: metrics in {path}, figures in {plots}: " +
          "; ".join(f"{k}-shot mIoU {result[f'{k}shot']['miou']:.2f}" for k in cfg.eval.shots))


if __name__ == "__main__":
    run(main)
