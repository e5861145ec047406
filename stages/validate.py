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
    write_json(OUT, {"valid": True, "checked": args.params})
    print(f"validate: {args.params} is valid ({len(cfg.flat())} parameters)")


if __name__ == "__main__":
    run(main)
