"""DVC stage `validate`: check every parameter, and what the parameters point to, before any other stage runs.

Every other stage depends on its output, so an unknown key, an invalid value, a device this machine does not
have, a backbone weights file that is missing or of another architecture, an MLflow store that cannot be
written, or a published model file that is missing stops `dvc repro` here, before DVC removes the outputs of
the stages that the change would re-run. `data/params.ok` holds no parameter value: a valid change leaves it
byte-identical and triggers nothing by itself. `data/inputs.json` holds the sha256 of each file a parameter
names (model.pretrained, train.released): the stages that read them depend on it, so a file replaced under the
same name reruns them (the stage runs at every `dvc repro` to see it: a few seconds of hashing).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse

from stages.common import run, setup, write_json

OUT = Path("data") / "params.ok"
INPUTS = Path("data") / "inputs.json"
KEYWORDS = ("imagenet", "synthetic", "random", "none")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_devices(cfg) -> list[str]:
    """A CUDA device asked for where there is none (torch imported only then)."""
    asked = {k: v for k, v in (("train.device", cfg.train.device), ("eval.device", cfg.eval.device))
             if v.startswith("cuda")}
    if not asked:
        return []
    import torch
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    wrong = [f"{k}: {v}" for k, v in asked.items() if int((v.split(":") + ["0"])[1]) >= have]
    return [f"{', '.join(wrong)} but this machine has {have} CUDA device(s) (torch {torch.__version__}); use auto "
            f"or cpu"] if wrong else []


def check_weights(cfg) -> list[str]:
    """model.pretrained given as a file: present and of model.backbone's architecture (loaded as training will)."""
    if cfg.model.pretrained in KEYWORDS:
        return []
    from pipeline.models.backbone import load_backbone
    try:
        load_backbone(cfg.model.backbone, cfg.model.pretrained, cfg.model.output_stride, 0, cfg.data.root,
                      cfg.model.dilation)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
        return [str(e)]
    return []


def check_tracking(cfg) -> list[str]:
    """The MLflow store: a local database or folder whose directory can be written, or a server that answers."""
    from pipeline.tracking import tracking_uri
    uri = tracking_uri(cfg)
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        import httpx
        try:
            httpx.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except httpx.HTTPError as e:
            return [f"the MLflow server {uri} does not answer ({type(e).__name__}); start it or set tracking.uri"]
        return []
    if parsed.scheme in ("databricks", "databricks-uc"):
        return []
    path = Path(uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else parsed.path or uri)
    folder = path if parsed.scheme in ("", "file") and not uri.startswith("sqlite") else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return [] if os.access(folder, os.W_OK) else [f"the MLflow store {uri} cannot be written ({folder} is read-only)"]


def input_files(cfg) -> tuple[dict, list[str]]:
    """({what: {file, sha256}}, problems) of the files the parameters name."""
    files, problems = {}, []
    if cfg.model.pretrained not in KEYWORDS and Path(cfg.model.pretrained).is_file():
        files["model.pretrained"] = {"file": cfg.model.pretrained, "sha256": sha256(Path(cfg.model.pretrained))}
    if cfg.train.released:
        from pipeline.data.benchmarks import fold_ids
        from pipeline.released import check_params, path_of
        wrong = check_params(cfg)
        if wrong:
            return files, [f"train.released {cfg.train.released}: params.yaml needs {'; '.join(wrong)} "
                           f"(`python -m stages.preset NAME --released FILE` writes them)"]
        paths = {(fold, shot): path_of(cfg, fold, shot) for fold in cfg.split.folds for shot in cfg.train.shots}
        missing = sorted({str(p) for p in paths.values() if not p.is_file()})
        if missing:
            problems.append(f"train.released: no file {', '.join(missing)} (split.folds {cfg.split.folds} of "
                            f"{fold_ids(cfg)}, train.shots {cfg.train.shots})")
        digests = {p: sha256(p) for p in set(paths.values()) if p.is_file()}
        for (fold, shot), path in paths.items():
            if path in digests:
                files[f"train.released fold {fold} {shot}-shot"] = {"file": str(path), "sha256": digests[path]}
    return files, problems


def main():
    args, cfg = setup(__doc__)     # exits with the offending key's name when params.yaml is invalid
    root = Path(cfg.data.folder.root)
    problems = []
    if cfg.data.benchmark == "folder" and not root.is_dir():   # say it before DVC misses the dependency
        problems.append(f"data.folder.root: {root} is not a folder; point it to your images (docs/own-data.md)")
    if cfg.data.local and cfg.data.benchmark in ("pascal", "coco") and not Path(cfg.data.local).is_dir():
        problems.append(f"data.local: {cfg.data.local} is not a folder; point it to the archives or extracted trees "
                        "you have (docs/paper.md, \"Data already on disk\"), or set it to \"\"")
    files, missing = input_files(cfg)
    problems += missing + check_devices(cfg) + check_weights(cfg) + check_tracking(cfg)
    if problems:
        OUT.unlink(missing_ok=True)
        raise SystemExit("error: " + "\nerror: ".join(problems))
    write_json(OUT, {"valid": True, "checked": args.params})
    write_json(INPUTS, files)                          # the same bytes while the files are the same: no rerun
    named = "".join(f"; {k} sha256 {v['sha256'][:12]}" for k, v in files.items())
    print(f"validate: {args.params} is valid ({len(cfg.flat())} parameters{named})")


if __name__ == "__main__":
    run(main)
