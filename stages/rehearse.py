"""`python -m stages.rehearse NAME` (or `make rehearse PRESET=NAME`): a preset's whole chain rehearsed on this
machine, on a miniature of its benchmark, before the GPU run.

In a copy of the project (`rehearsal/<NAME>/`, git-ignored: this checkout's params.yaml, data and models are not
touched): params.yaml written from the preset; a miniature of its benchmark (fold 0's first two novel and three
base classes, two 64 px images each, in the real archive layouts) built, served on 127.0.0.1 and fetched by the
real download code, the download stage then committed as done (the miniature's checksums are its own, as with
data already on disk); random backbone weights in the preset's file layout where model.pretrained names a file
(the rehearsal checks the chain, not the numbers); the preset shrunk (``SMALL``: fold 0, one shot count, one
epoch, 64 px, a few episodes, BAM's base learner likewise). It runs `dvc repro` up to evaluation and prints the
comparison with the paper before the export starts, then the rest of the chain and the fold summary.
About a minute on 2 cores for a VGG-16 or ResNet-50 preset; the log is `rehearsal/<NAME>/rehearse.log`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ("data/", "models/", "metrics/", "plots/", "results/", "checkpoints/", "mlartifacts/", "rehearsal/",
           "dvc.lock", "mlflow.db")
# what makes a preset long, shrunk (the architecture kept: a published model's file must still fit)
SMALL = {"split.folds": [0], "split.min_pixels": 64, "train.shots": [1], "eval.shots": [1], "export.shots": [1],
         "train.epochs": 1, "train.batch_size": 2, "train.crop_size": 64, "train.val_episodes": 2, "train.workers": 0,
         "train.devices": 1, "data.workers": 1, "eval.episodes": 2, "eval.seeds": [510], "eval.test_size": 64,
         "eval.figure_episodes": 1, "export.parity_episodes": 1, "base.epochs": 1, "base.batch_size": 2,
         "base.crop_size": 64, "base.val_images": 2, "base.workers": 0, "base.devices": 1}


def copy_project(dst: Path, root: Path = ROOT) -> None:
    """The checkout's files (tracked, and untracked but not ignored) copied to ``dst``, without its outputs."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        if f.startswith(OUTPUTS) or not (root / f).is_file():
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, dst / f)


class Shell:
    """Commands in the copy, with this interpreter's environment first on PATH (dvc, python); output to a log."""

    def __init__(self, proj: Path, log: Path | None = None):
        self.proj, self.log = proj, log
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONPATH": str(proj), "GIT_AUTHOR_NAME": "rehearsal", "GIT_AUTHOR_EMAIL": "rehearsal@localhost",
                    "GIT_COMMITTER_NAME": "rehearsal", "GIT_COMMITTER_EMAIL": "rehearsal@localhost"}
        self.env.pop("MLFLOW_TRACKING_URI", None)     # the copy's own store (mlflow.db in it)

    def __call__(self, cmd: str, check: bool = True) -> str:
        r = subprocess.run(cmd, shell=True, cwd=self.proj, env=self.env, capture_output=True, text=True)
        out = r.stdout + r.stderr
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"$ {cmd}\n{out}\n")
        if check and r.returncode:
            raise RuntimeError(f"`{cmd}` failed in {self.proj} (exit {r.returncode}):\n{out[-3000:]}")
        return out


def random_weights(cfg, path: Path) -> None:
    """ImageNet-shaped random weights in the layout model.pretrained expects (torchvision's, PSPNet's deep stem)."""
    import torch
    import torchvision

    from pipeline.models.backbone import Backbone, to_checkpoint_state
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16_bn(weights=None).state_dict() if cfg.model.backbone == "vgg16_bn"
               else to_checkpoint_state(Backbone(cfg.model.backbone)), path)


def prepare(name: str, proj: Path, preset_args: str = "", log: Path | None = None, before=None):
    """The copy with preset ``name`` (``python -m stages.preset NAME {preset_args}``), shrunk (``SMALL``), and the
    miniature adopted as its download; ``before(project, config)`` runs before the first stage (to place files
    params.yaml names). Returns (project, shell, config)."""
    from pipeline.config import load_config
    from pipeline.data import sources
    from pipeline.data.benchmarks import fold_classes
    from pipeline.data.download import Resource
    from pipeline.data.miniature import ArchiveServer, build_coco, build_pascal, episode_blocks
    proj.mkdir(parents=True)
    copy_project(proj)
    sh = Shell(proj, log)
    sh("git init -q && git add -A && git commit -qm rehearsal")
    sh(f"python -m stages.preset {name} {preset_args}")
    shrink(proj / "params.yaml")
    cfg = load_config(proj / "params.yaml")
    if cfg.data.benchmark not in ("pascal", "coco"):
        raise ValueError(f"preset {name} is on {cfg.data.benchmark}: the rehearsal has miniatures of pascal and coco")
    if cfg.model.pretrained not in ("imagenet", "synthetic", "random", "none"):
        random_weights(cfg, proj / cfg.model.pretrained)
    if before:
        before(proj, cfg)
    novel, base = fold_classes(cfg, 0)
    mirror = proj / "rehearsal-mirror"
    build = build_pascal if cfg.data.benchmark == "pascal" else build_coco
    digests = build(mirror, episode_blocks(novel[:2], base[:3]))
    official = sources.PASCAL if cfg.data.benchmark == "pascal" else sources.COCO
    with ArchiveServer(mirror) as srv:
        res = [(Resource(f"{srv.url}/{r.filename}", r.filename, md5=digests[r.filename]), m) for r, m in official]
        sh("dvc repro validate")
        sources.fetch_benchmark(cfg.data.benchmark, proj / "data", resources=res, workers=1)
    (proj / "data/weights/imagenet").mkdir(parents=True, exist_ok=True)
    (proj / "data/weights/imagenet/weights.json").write_text('{"note": "the rehearsal: model.pretrained is a file"}\n')
    sh("dvc commit -f download")
    return proj, sh, cfg


def shrink(params: Path, small: dict = SMALL) -> None:
    p = yaml.safe_load(params.read_text())
    for key, value in small.items():
        section, name = key.split(".")
        p[section][name] = value
    params.write_text(yaml.safe_dump(p, sort_keys=False))


def rehearse(name: str, workdir: Path, preset_args: str = "", say=print) -> dict:
    """The whole rehearsal; returns {"evaluate", "metrics", "summary", "seconds"}."""
    t0 = time.perf_counter()
    if workdir.exists():
        shutil.rmtree(workdir)
    log = workdir.with_name(workdir.name + ".log")
    log.unlink(missing_ok=True)
    say(f"rehearse {name}: a copy of the project in {workdir}, a miniature of its benchmark on 127.0.0.1 (log {log})")
    proj, sh, cfg = prepare(name, workdir, preset_args, log)
    say(f"rehearse {name}: data adopted ({time.perf_counter() - t0:.0f} s); training fold 0, 1-shot, one epoch at 64 px"
        + (" after BAM's base learner" if cfg.model.head == "bam" else ""))
    sh("dvc repro evaluate@0-1")
    evaluated = json.loads((proj / "models/fold0/1shot/evaluate.json").read_text())
    if cfg.eval.paper:                             # before the export: the comparison does not wait for it
        from pipeline.paper import compare, published
        for key, c in compare(cfg.eval.paper, 0, evaluated).items():
            say(f"rehearse {name}: fold 0 {key} mIoU {c['measured']:.2f}, the paper {c['paper']:.2f} "
                f"({published(cfg.eval.paper)['source']}): {c['difference']:+.2f} (a miniature and one epoch: the "
                f"chain, not the number)")
    say(f"rehearse {name}: evaluated ({time.perf_counter() - t0:.0f} s); merge, export, report, summary")
    sh("dvc repro")
    summary = (proj / "results/folds.md").read_text()
    say(summary)
    seconds = time.perf_counter() - t0
    say(f"rehearse {name}: the whole chain ran in {seconds:.0f} s; the copy stays in {workdir} "
        f"(`cd {workdir} && dvc metrics show`), this checkout's params.yaml is unchanged")
    return {"evaluate": evaluated, "metrics": json.loads((proj / "metrics/fold0.json").read_text()),
            "summary": json.loads((proj / "results/folds.json").read_text()), "seconds": seconds, "project": proj}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m stages.rehearse", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="a preset (presets/<name>.yaml)")
    ap.add_argument("--dir", default=None, help="the copy (default: rehearsal/<name>)")
    args = ap.parse_args(argv)
    from pipeline.config import ConfigError
    from stages.preset import render
    try:
        render(args.name)                              # an unknown preset named before anything is copied
        rehearse(args.name, Path(args.dir or Path("rehearsal") / args.name).resolve())
    except (ConfigError, RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
