"""DVC stage `split`: per-fold (image, class) pairs with the pixel rule and the chosen image filter."""
from __future__ import annotations

from pipeline.data.benchmarks import class_names, fold_classes, fold_ids, prepared_dir, split_dir
from pipeline.data.split import compare_with_reference, make_splits
from stages.common import run, setup, write_json


def main():
    _, cfg = setup(__doc__)
    d, s = cfg.data, cfg.split
    out = split_dir(d.root, d.benchmark)
    prepared = prepared_dir(d.root, d.benchmark)
    summary = make_splits(prepared, out, {f: fold_classes(cfg, f) for f in fold_ids(cfg)}, s.min_pixels, s.filter,
                          checked=s.folds if d.benchmark == "folder" else (), names=class_names(prepared))
    counts = write_json(out / "counts.json", {"benchmark": d.benchmark, "filter": s.filter,
                                              "min_pixels": s.min_pixels, **summary})
    for fold, v in summary.items():
        print(f"split {fold}: {v['train_pairs']} train pairs ({v['train_images']} images), "
              f"{v['val_pairs']} val pairs ({v['val_images']} images)")
    if s.reference_lists:
        for fold, c in compare_with_reference(out, s.folds, s.reference_lists).items():
            print(f"split fold{fold} against {s.reference_lists}: {c['both']} training images in both, "
                  f"{c['ours'] - c['both']} only here, {c['theirs'] - c['both']} only there"
                  + (" (the same list)" if c["same"] else ""))
    print(f"split: lists in {out}, pair counts per class in {counts}")


if __name__ == "__main__":
    run(main)
