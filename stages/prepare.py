"""DVC stage `prepare`: raw benchmark -> images, label PNGs, lists, class pixel counts."""
from __future__ import annotations

from pipeline.data.benchmarks import prepared_dir, raw_dir
from pipeline.data.prepare import prepare
from stages.common import run, setup


def main():
    _, cfg = setup(__doc__)
    d = cfg.data
    out = prepared_dir(d.root, d.benchmark)
    counts = prepare(d.benchmark, raw_dir(d.root, d.benchmark), out, d.workers)
    print(f"prepare: {counts['train_images']} train and {counts['val_images']} val images in {out}")


if __name__ == "__main__":
    run(main)
