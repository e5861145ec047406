"""DVC stage `prepare`: raw benchmark -> images, label PNGs, lists, class pixel counts."""
from __future__ import annotations

from pipeline.data.benchmarks import data_workers, prepared_dir, raw_dir
from pipeline.data.folder import format_report
from pipeline.data.prepare import prepare
from stages.common import run, setup


def main():
    _, cfg = setup(__doc__)
    d = cfg.data
    out = prepared_dir(d.root, d.benchmark)
    src = d.folder.root if d.benchmark == "folder" else raw_dir(d.root, d.benchmark)
    counts = prepare(d.benchmark, src, out, data_workers(d.workers), folder=d.folder)
    if d.benchmark == "folder":
        print(format_report(counts["classes"]))
    print(f"prepare: {counts['train_images']} train and {counts['val_images']} val images in {out} "
          f"(images and pixels per class: {out / 'class_report.json'})")


if __name__ == "__main__":
    run(main)
