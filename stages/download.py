"""DVC stage `download`: fetch and verify the benchmark (or generate the synthetic one) and backbone weights."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pipeline.data import sources
from pipeline.data.benchmarks import raw_dir
from pipeline.data.download import Resource, download, extract
from pipeline.data.synthetic import generate
from pipeline.models.backbone import weights_path
from stages.common import run, setup, write_json

log = logging.getLogger("download")


def _mirrored(res: Resource, mirror: str) -> Resource:
    return res.with_url(mirror.rstrip("/") + "/" + res.filename) if mirror else res


def fetch_benchmark(benchmark: str, root: str, mirror: str = "", synthetic=None, workers: int = 2) -> Path:
    raw = raw_dir(root, benchmark)
    if benchmark == "synthetic":
        tmp = raw.parent / f".{raw.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        counts = generate(tmp, synthetic.num_train, synthetic.num_val, synthetic.image_size, synthetic.seed, workers)
        shutil.rmtree(raw, ignore_errors=True)
        os.replace(tmp, raw)
        log.info("generated the synthetic benchmark (%s) in %s", counts, raw)
        return raw
    resources = sources.PASCAL if benchmark == "pascal" else sources.COCO
    for res, marker in resources:
        path = download(_mirrored(res, mirror), raw / "archives")
        if marker:
            extract(path, raw, marker)
        else:
            shutil.copyfile(path, raw / res.filename)
    log.info("%s downloaded, verified and extracted in %s", benchmark, raw)
    return raw


def fetch_weights(archs, root: str, mirror: str = "") -> dict:
    got = {}
    for arch in archs:
        res = _mirrored(sources.backbone_resource(arch), mirror)
        path = download(res, Path(root) / "weights" / "archives")
        dest = weights_path(root, arch)
        if dest.exists():
            dest.unlink()
        os.link(path, dest)
        got[arch] = {"file": str(dest), "url": res.url, "sha256_prefix": res.sha256}
    return got


def main():
    _, cfg = setup(__doc__)
    d = cfg.data
    fetch_benchmark(d.benchmark, d.root, d.mirror, d.synthetic, d.workers)
    wdir = Path(d.root) / "weights"
    wdir.mkdir(parents=True, exist_ok=True)
    if cfg.model.pretrained == "imagenet":
        archs = sorted(set(d.backbones) | {cfg.model.backbone})
        weights = fetch_weights(archs, d.root, d.mirror)
    else:
        weights = {"note": f"model.pretrained is {cfg.model.pretrained!r}: no ImageNet weights needed"}
    write_json(wdir / "weights.json", weights)
    print(f"download: raw data in {raw_dir(d.root, d.benchmark)}, weights in {wdir}")


if __name__ == "__main__":
    run(main)
