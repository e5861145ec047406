"""DVC stage `validate`: check every parameter before any other stage runs.

Every other stage depends on its output, so an unknown key or an invalid value stops `dvc repro`
here, before DVC removes the outputs of the stages that the change would re-run. The output holds
no parameter value: a valid change leaves it byte-identical and triggers nothing by itself.
"""
from __future__ import annotations

from pathlib import Path

from stages.common import run, setup, write_json

OUT = Path("data") / "params.ok"


def main():
    args, cfg = setup(__doc__)     # exits with the offending key's name when params.yaml is invalid
    root = Path(cfg.data.folder.root)
    if cfg.data.benchmark == "folder" and not root.is_dir():   # say it before DVC misses the dependency
        OUT.unlink(missing_ok=True)
        raise SystemExit(f"error: data.folder.root: {root} is not a folder; point it to your images (docs/own-data.md)")
    if cfg.train.released:     # what the file's format fixes must be in params.yaml, and each file on disk
        from pipeline.data.benchmarks import fold_ids
        from pipeline.released import check_params, path_of
        wrong = check_params(cfg)
        missing = [] if wrong else sorted({str(path_of(cfg, f, k)) for f in cfg.split.folds for k in cfg.train.shots
                                           if not path_of(cfg, f, k).is_file()})
        if wrong or missing:
            OUT.unlink(missing_ok=True)
            raise SystemExit(f"error: train.released {cfg.train.released}: " + (
                f"params.yaml needs {'; '.join(wrong)} (`python -m stages.preset NAME --released FILE` writes them)"
                if wrong else f"no file {', '.join(missing)} (folds {cfg.split.folds} of {fold_ids(cfg)}, "
                              f"train.shots {cfg.train.shots})"))
    write_json(OUT, {"valid": True, "checked": args.params})
    print(f"validate: {args.params} is valid ({len(cfg.flat())} parameters)")


if __name__ == "__main__":
    run(main)
