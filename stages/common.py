"""What every stage shares: argument parsing, logging, config loading, atomic JSON writes."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.data.benchmarks import fold_ids


_FOLD_HINT = ""


def _prog() -> str:
    """The command as users type it: ``python -m stages.<name>``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec is not None and spec.name else Path(sys.argv[0]).name


def model_dir(fold: int, shots: int) -> Path:
    """Where the model of ``fold`` trained with ``shots``-shot episodes and its reports live."""
    return Path("models") / f"fold{fold}" / f"{shots}shot"


def plots_dir(fold: int, shots: int) -> Path:
    return Path("plots") / f"fold{fold}" / f"{shots}shot"


def fold_hint(cfg, fold: int, shots: int, stage: str) -> str:
    """What to change when a model's input is missing: DVC builds only the folds of split.folds and the
    shot counts of train.shots."""
    name = f"{stage}@{fold}-{shots}"
    unlisted = [f"add {fold} to split.folds"] if fold not in cfg.split.folds else []
    unlisted += [f"add {shots} to train.shots"] if shots not in cfg.train.shots else []
    if not unlisted:
        return f"run `dvc repro {name}`"
    return (f"`dvc repro` builds the folds of split.folds {cfg.split.folds} and the shot counts of train.shots "
            f"{cfg.train.shots} only: {' and '.join(unlisted)} in params.yaml, then run `dvc repro {name}`")


def setup(description: str, fold: bool = False, extra=None):
    global _FOLD_HINT
    ap = argparse.ArgumentParser(prog=_prog(), description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra:
        extra(ap)
    ap.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    if fold:
        ap.add_argument("--fold", type=int, required=True, help="fold 0..3 (a folder benchmark: 0..split.num_folds-1)")
        ap.add_argument("--shot", type=int, default=None,
                        help="the model trained with this many shots (default: the first of train.shots)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "alembic", "mlflow.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        cfg = load_config(args.params)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if fold and args.fold not in fold_ids(cfg):
        sys.exit(f"error: unknown fold {args.fold}; choose one of {fold_ids(cfg)}")
    if fold:
        args.shot = cfg.train.shots[0] if args.shot is None else args.shot
        if args.shot < 1:
            sys.exit(f"error: --shot must be a positive shot count, got {args.shot}")
        _FOLD_HINT = fold_hint(cfg, args.fold, args.shot, "train")
    return args, cfg


def under_torchrun(c, section: str, module: str) -> bool:
    """Run the stage under torchrun when ``<section>.devices`` or ``.nodes`` ask for more than one process, so that
    `dvc repro` trains on every GPU and records the result; True when it did (this process then only waited).
    Several nodes rendezvous at ``<section>.master`` with static ranks: node 0 is the one running `dvc repro` and
    writes the outputs; the others run the command printed here."""
    if "LOCAL_RANK" in os.environ:                    # already a torchrun worker
        return False
    n = c.devices
    if n == "auto":
        import torch
        n = torch.cuda.device_count() or 1
    if n == 1 and c.nodes == 1:
        return False
    world = n * c.nodes
    if c.batch_size % world:
        sys.exit(f"error: {section}.batch_size {c.batch_size} is the global batch: make it a multiple of the {world} "
                 f"processes")
    head = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--nnodes={c.nodes}"]
    tail = ["-m", module, *sys.argv[1:]]
    if c.nodes > 1:
        host, port = c.master.rsplit(":", 1)
        head += [f"--master_addr={host}", f"--master_port={port}"]
        other = " ".join(["python", *head[1:], "--node_rank=N", *tail])
        print(f"{section}: waiting for {c.nodes - 1} more node(s) at {c.master}; on each, in this project with the "
              f"same params.yaml and data, run (N = 1 to {c.nodes - 1}, one per node):\n  {other}", flush=True)
        head.append("--node_rank=0")
    else:
        head.append("--standalone")
    print(f"{section}: {world} processes ({n} per node x {c.nodes} node(s)); global batch {c.batch_size}, "
          f"{c.batch_size // world} per process", flush=True)
    proc = subprocess.Popen([*head, *tail])
    try:
        code = proc.wait()
    except BaseException:                             # SIGTERM or Ctrl-C: torchrun stops its workers itself
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if code:
        sys.exit(code)
    return True


def write_json(path: str | Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def run(main) -> None:
    """Run a stage's main(); user-facing errors end with one clear line instead of a traceback. SIGTERM (DVC or
    a scheduler stopping the stage) leaves through the stage's `with` blocks, so its MLflow run ends FAILED
    rather than staying RUNNING."""
    import signal
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        main()
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        if os.environ.get("SVF_FSS_DEBUG"):
            raise
        msg = str(e)
        if isinstance(e, FileNotFoundError) and _FOLD_HINT and "dvc repro train`" in msg:
            msg = re.sub(r"run the train stage \(`dvc repro train`\)( first)?", _FOLD_HINT, msg)
        elif isinstance(e, FileNotFoundError) and _FOLD_HINT and "only:" in _FOLD_HINT:
            msg = f"{msg}; {_FOLD_HINT}"
        logging.getLogger("stage").error("%s: %s", type(e).__name__, msg)
        sys.exit(1)
