"""DVC stage `evaluate`: episodic evaluation of one trained model over several seeds.

The k-shot model is scored on k-shot episodes; a shot count of eval.shots that no model was trained
for is scored by the first model of train.shots, and its results are labelled with the model's shot
count (``5shot_by1``): a 1-shot model scored with 5 shots is not the protocol, and says so.
"""
from __future__ import annotations

import logging

from pipeline import tracking
from pipeline.data.benchmarks import class_names, fold_classes, prepared_dir, require, split_dir
from stages.common import model_dir, plots_dir, run, setup, write_json

log = logging.getLogger("evaluate")


def main():
    args, cfg = setup(__doc__, fold=True, extra=lambda ap: ap.add_argument(
        "--untrained", action="store_true", help="score the model before training (the baseline); not tracked"))
    out, plots = model_dir(args.fold, args.shot), plots_dir(args.fold, args.shot)
    if not args.untrained:                     # before torch is imported: a missing model fails at once
        require(out / "adapter.pt", "adapter", "train")
    import torch

    from pipeline import adapter as adapter_io
    from pipeline.data.episodes import EpisodeDataset, episodes_possible
    from pipeline.evaluate import evaluate, shot_key, spread_text, summarise
    from pipeline.figures import episodes_figure
    from pipeline.models import accepts_shots, fixed_shots
    from pipeline.loop import describe_device
    from pipeline.train import pick_device
    if args.untrained:
        from pipeline.models import build_model
        base = adapter_io.read_base(adapter_io.base_path(out / "adapter.pt"), cfg, args.fold) \
            if cfg.model.head == "bam" else None
        model = build_model(cfg, base=base, shots=args.shot)[0].eval()
        plots = plots / "untrained"
    else:
        model, _ = adapter_io.load_model(out / "adapter.pt", cfg)
    device = pick_device(cfg.eval.device)
    model.to(device)
    prepared = prepared_dir(cfg.data.root, cfg.data.benchmark)
    pairs = split_dir(cfg.data.root, cfg.data.benchmark, args.fold) / "val.jsonl"
    names = class_names(prepared)
    novel = fold_classes(cfg, args.fold)[0]
    shots = [k for k in eval_shots(cfg, args.shot) if accepts_shots(model, k)]
    if not shots:
        raise ValueError(f"the {args.shot}-shot {cfg.model.head} model takes exactly {fixed_shots(model)} shots and "
                         f"eval.shots {cfg.eval.shots} asks none it can score")
    result = {"fold": args.fold, "model_shots": args.shot, "benchmark": cfg.data.benchmark,
              "finetune": cfg.model.finetune, "protocol": cfg.eval.protocol, "episodes_per_seed": cfg.eval.episodes,
              "seeds": cfg.eval.seeds, "device": describe_device(device)}
    figures = []
    torch.manual_seed(0)
    for k in list(shots):
        if k != args.shot and not episodes_possible(pairs, k):
            log.warning("%d-shot episodes skipped: no novel class of fold %d has %d val images (%s)", k, args.fold,
                        k + 1, pairs)
            shots.remove(k)
            continue
        accs = []
        for i, seed in enumerate(cfg.eval.seeds):
            ds = EpisodeDataset(prepared, pairs, k, "test", cfg.eval.test_size, seed=seed, episodes=cfg.eval.episodes,
                                protocol=cfg.eval.protocol)
            if cfg.eval.protocol == "bam":
                seed_everything(seed)
            acc, kept = evaluate(model, ds, device, desc=f"{k}-shot seed {seed}", classes=novel,
                                 keep=cfg.eval.figure_episodes if i == 0 else 0, workers=cfg.train.workers)
            accs.append(acc)
            if kept:
                path = plots / "episodes" / f"{k}shot.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                episodes_figure(kept, path, names, f"fold {args.fold}, {k}-shot episodes, {args.shot}-shot model, "
                                                   f"{cfg.model.finetune}")
                figures.append(path)
        s = summarise(accs)
        for key in ("per_class_iou", "per_class_iou_per_seed"):
            s[key] = {names[int(c) - 1]: v for c, v in s[key].items()}
        s["model_shots"] = args.shot
        result[shot_key(k, args.shot)] = s
        log.info("fold %d, %d-shot episodes, %d-shot model: %s", args.fold, k, args.shot, spread_text(s))
    if args.untrained:
        path = write_json(plots / "evaluate.json", result)
        print(f"evaluate (untrained) fold {args.fold}: " +
              "; ".join(f"{k}-shot mIoU {result[shot_key(k, args.shot)]['miou']:.2f}" for k in shots) + f" -> {path}")
        return
    path = write_json(out / "evaluate.json", result)
    with tracking.evaluation_run(cfg, out) as t:
        for k in shots:
            key, s = shot_key(k, args.shot), result[shot_key(k, args.shot)]
            t.metrics({f"{key}_miou": s["miou"], f"{key}_miou_std": s["miou_std"], f"{key}_fbiou": s["fbiou"]})
        t.tags({"evaluate.device": result["device"]})
        t.artifact(path, "evaluate")
        for f in figures:
            t.artifact(f, "evaluate")
    print(f"evaluate fold {args.fold}, {args.shot}-shot model: report in {path}, figures in {plots / 'episodes'}: " +
          "; ".join(f"{shot_key(k, args.shot)} mIoU {result[shot_key(k, args.shot)]['miou']:.2f}" for k in shots))


def eval_shots(cfg, model_shots: int) -> list[int]:
    """The shot counts the ``model_shots``-shot model is scored on: its own, and those of eval.shots that
    no model was trained for when it is the first of train.shots."""
    first = model_shots == cfg.train.shots[0]
    return [k for k in cfg.eval.shots if k == model_shots or (first and k not in cfg.train.shots)] or [model_shots]


def seed_everything(seed: int) -> None:
    """BAM's test.py seeds Python's random, numpy and torch with each seed."""
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


if __name__ == "__main__":
    run(main)
