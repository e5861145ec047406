"""DVC stage `download`: fetch and verify the benchmark (or generate the synthetic one) into data/raw.

It reads its parameters straight from params.yaml (the `validate` stage has checked the file): those dvc.yaml
declares for it, and data.root and data.workers, which do not change what it fetches. It imports only the
data-fetching code: DVC reruns it when what it fetches changes
(benchmark, URLs, checksums, the generator), never for an edit of the models or the config schema. Its output
is `persist`: a rerun keeps what was verified before (data/raw/<benchmark>/verified.json) and fetches nothing
again. The ImageNet weights are the `weights` stage's.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml

from pipeline.data.benchmarks import raw_dir
from pipeline.data.download import DiskSpaceError, DownloadError, UnsafeArchiveError
from pipeline.data.sources import fetch_benchmark

DECLARED = ("data.benchmark", "data.root", "data.mirror", "data.workers", "data.keep_archives", "data.local",
            "data.folder.root",
            "data.synthetic.num_train", "data.synthetic.num_val", "data.synthetic.image_size", "data.synthetic.seed")


def declared(params: Path) -> SimpleNamespace:
    """data.* of params.yaml as attributes; a key missing is named with the fix."""
    tree = yaml.safe_load(params.read_text()) if params.exists() else None
    if not isinstance(tree, dict):
        sys.exit(f"error: {params} is missing or not a mapping; run `dvc repro` from the project root")
    values = {}
    for key in DECLARED:
        node = tree
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                sys.exit(f"error: {params} lacks {key}; `python -m stages.preset <name>` writes a complete file")
            node = node[part]
        values[key] = node
    d = {k.split(".", 1)[1]: v for k, v in values.items()}
    return SimpleNamespace(
        benchmark=d["benchmark"], root=d["root"], mirror=d["mirror"], workers=d["workers"],
        keep_archives=d["keep_archives"], local=d["local"], folder=SimpleNamespace(root=d["folder.root"]),
        synthetic=SimpleNamespace(**{k.split(".", 1)[1]: v for k, v in d.items() if k.startswith("synthetic.")}))


def main():
    ap = argparse.ArgumentParser(prog="python -m stages.download", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    d = declared(Path(args.params))
    try:
        fetch_benchmark(d.benchmark, d.root, d.mirror, d.synthetic, d.workers, folder=d.folder,
                        keep_archives=d.keep_archives, local=d.local)
    except (DownloadError, DiskSpaceError, UnsafeArchiveError, FileNotFoundError, ValueError) as e:
        logging.getLogger("stage").error("%s: %s", type(e).__name__, e)
        sys.exit(1)
    print(f"download: raw data in {raw_dir(d.root, d.benchmark)}")


if __name__ == "__main__":
    main()
