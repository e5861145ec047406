"""DVC stage `merge`: fold the singular values back into dense convs; parity against the unmerged model."""
from __future__ import annotations

import copy

from pipeline import tracking
from pipeline.data.benchmarks import prepared_dir, require, split_dir
from stages.common import model_dir, run, setup, write_json


def parity(a, b, batches) -> dict:
    import torch
    worst_abs, worst_rel = 0.0, 0.0
    with torch.no_grad():
        for q, s, m in batches:
            x, y = a(q, s, m).double(), b(q, s, m).double()
            worst_abs = max(worst_abs, float((x - y).abs().max()))
            worst_rel = max(worst_rel, float((x - y).norm() / y.norm().clamp_min(1e-30)))
    return {"max_abs": worst_abs, "max_rel": worst_rel, "batches": len(batches)}


def main():
    args, cfg = setup(__doc__, fold=True)
    out = model_dir(args.fold, args.shot)
    require(out / "adapter.pt", "adapter", "train")      # before torch is imported: fails at once
    from pipeline import adapter as adapter_io
    from pipeline.data.episodes import fixed_batches
    from pipeline.models import accepts_shots
    from pipeline.svf import SVFConv2d, merge_svf
    unmerged, acfg = adapter_io.load_model(out / "adapter.pt")
    n_svf = sum(isinstance(m, SVFConv2d) for m in unmerged.modules())
    merged = merge_svf(copy.deepcopy(unmerged)).eval()
    assert not any(isinstance(m, SVFConv2d) for m in merged.modules())
    batches = fixed_batches(prepared_dir(cfg.data.root, cfg.data.benchmark),
                            split_dir(cfg.data.root, cfg.data.benchmark, args.fold) / "val.jsonl",
                            cfg.eval.test_size, [k for k in cfg.export.shots if accepts_shots(merged, k)] or [args.shot],
                            cfg.export.parity_episodes)
    report = {"fold": args.fold, "model_shots": args.shot, "svf_layers_merged": n_svf,
              "tolerance_rel": cfg.export.merge_tolerance, **parity(merged, unmerged, batches)}
    report["passed"] = report["max_rel"] <= cfg.export.merge_tolerance
    write_json(out / "merge.json", report)
    if not report["passed"]:
        raise ValueError(f"merged model differs from the unmerged one: relative error {report['max_rel']:.3g} > "
                         f"export.merge_tolerance {cfg.export.merge_tolerance:g} (see {out / 'merge.json'})")
    path = adapter_io.save(adapter_io.merged_state(merged, acfg, report), out / "merged.pt")
    with tracking.resume_run(cfg, out, "merge") as t:
        t.metrics({"merge_max_rel": report["max_rel"], "merge_max_abs": report["max_abs"]})
        t.artifact(out / "merge.json", "merge")
    print(f"merge fold {args.fold}, {args.shot}-shot model: {n_svf} SVF convs folded into dense convs -> {path} "
          f"(parity: max rel {report['max_rel']:.2e}, max abs {report['max_abs']:.2e})")


if __name__ == "__main__":
    run(main)
