"""`python -m stages.preset NAME` (or `make repro PRESET=NAME`): write params.yaml from a preset.

A preset (presets/NAME.yaml) names only what its setting fixes, each value with its source; every
other key takes the schema's default (pipeline/config.py). This command validates the preset and
writes the complete params.yaml that `dvc repro` needs (dvc.yaml's templates and `params:` read
every key from it). The previous params.yaml, when it differs, is kept as params.yaml.bak.
Not a DVC stage: it chooses the parameters the stages run with.
"""
from __future__ import annotations

import argparse
import difflib
import os
import shutil
import sys
from pathlib import Path

import yaml

from pipeline.config import ConfigError, load_config

PRESETS = Path("presets")


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for lists (``folds: [0, 1, 2, 3]``)."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def render(name: str, presets: Path = PRESETS, released: str = "", released_format: str = "") -> str:
    """The params.yaml text of preset ``name``; ConfigError (naming the key) when the preset is invalid.
    ``released``: a published model's file (``{fold}``, ``{shot}`` placeholders) adopted instead of training,
    with the settings its format's code fixes (pipeline/released.py)."""
    path = presets / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in presets.glob("*.yaml"))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"no preset {name!r} in {presets}/{hint}; choose one of: {', '.join(known)}")
    try:
        cfg = load_config(path)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if released:
        from pipeline.released import FORMATS, released_params
        if released_format and released_format not in FORMATS:
            raise ConfigError(f"--released-format {released_format!r}: choose one of {', '.join(FORMATS)}")
        cfg = released_params(cfg, released, released_format, template=True)
        cfg = load_config(cfg.to_dict())          # validated as every stage will read it
    head = (f"# Written by `python -m stages.preset {name}` from {path} (its values cite their sources) over the\n"
            f"# schema's defaults (pipeline/config.py). Edit freely; `git checkout params.yaml` restores the default.\n")
    return head + yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False, width=120)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m stages.preset", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="a preset's name: " + ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml"))))
    ap.add_argument("--out", default="params.yaml", help="the file written (default: params.yaml)")
    ap.add_argument("--released", default="", metavar="FILE", help="adopt a published model instead of training "
                    "(train.released; {fold} and {shot} in FILE name one file per fold and shot count), with the "
                    "settings its authors' code fixes (docs/released.md)")
    ap.add_argument("--released-format", default="", choices=["", "pfenet", "bam", "svf"],
                    help="the code that wrote FILE (default: the head's own; the baseline's is svf)")
    args = ap.parse_args(argv)
    name = Path(args.name).stem if args.name.endswith(".yaml") else args.name
    try:
        text = render(name, released=args.released, released_format=args.released_format)
    except ConfigError as e:
        sys.exit(f"error: {e}")      # nothing written
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    if out.exists() and out.read_text() != text:
        shutil.copy2(out, out.with_name(out.name + ".bak"))
        print(f"preset: the previous {out} is kept as {out.name}.bak")
    os.replace(tmp, out)
    adopted = f", adopting {args.released} instead of training" if args.released else ""
    print(f"preset: {out} now holds {PRESETS / (name + '.yaml')}{adopted}; run `make repro` (`dvc repro --dry -f` lists its stages)")


if __name__ == "__main__":
    main()
