"""The only module that talks to MLflow.

One MLflow run per fold per pipeline execution: the train stage opens it and records its id in
``models/fold<i>/<k>shot/mlflow_run.json`` (a stage output); evaluate, merge, export and report reopen that
run and add to it. The tracking URI defaults to a SQLite file at the repository root, also when the
stage runs inside a `dvc exp run` temporary workspace (.dvc/tmp/exps/...).

MLflow stores artifact locations as absolute paths. The project's own database therefore follows
the project: when it finds locations under another folder's ``mlartifacts/`` (the project was
copied or moved), it rewrites them to this root's (``relocate``), so a copy never writes into the
original's artifacts.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path

import yaml

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def repo_root(start: str | Path | None = None) -> Path:
    """The project root: the real one even from a DVC experiment's temporary copy."""
    p = Path(start or os.getcwd()).resolve()
    parts = p.parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for q in [p, *p.parents]:
        if (q / "dvc.yaml").exists() or (q / ".dvc").is_dir():
            return q
    return p


def tracking_uri(cfg=None) -> str:
    uri = (cfg.tracking.uri if cfg is not None else "") or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{repo_root() / 'mlflow.db'}"


# (table, column) pairs of MLflow's SQL schema that hold artifact locations
_LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("model_versions", "source"), ("model_versions", "storage_location"),
                     ("logged_models", "artifact_location"))


def relocate(db: str | Path, root: str | Path) -> int:
    """Point every artifact location under another folder's ``mlartifacts/`` at ``root``'s.

    Returns the number of rows changed (0 for a database made here). Only for the project's own
    SQLite file: a configured tracking server or database is never touched.
    """
    import sqlite3
    db, mine = Path(db), (Path(root).resolve() / "mlartifacts").as_uri()
    if not db.exists():
        return 0
    con = sqlite3.connect(str(db))
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "experiments" not in tables:
            return 0
        olds = set()
        for (loc,) in con.execute("SELECT artifact_location FROM experiments"):
            m = re.match(r"(file://.*?/mlartifacts)(/|$)", loc or "")
            if m and m.group(1) != mine:
                olds.add(m.group(1))
        changed = 0
        for old in olds:
            for table, col in _LOCATION_COLUMNS:
                if table in tables and col in {r[1] for r in con.execute(f"PRAGMA table_info({table})")}:
                    changed += con.execute(f"UPDATE {table} SET {col} = ? || substr({col}, ?) WHERE {col} = ? "
                                           f"OR substr({col}, 1, ?) = ?",
                                           (mine, len(old) + 1, old, len(old) + 1, old + "/")).rowcount
        con.commit()
        return changed
    finally:
        con.close()


def _mlflow(cfg):
    import logging

    import mlflow
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri(cfg)
    own = f"sqlite:///{repo_root() / 'mlflow.db'}"
    if uri == own and relocate(repo_root() / "mlflow.db", repo_root()):
        logging.getLogger(__name__).info("mlflow.db came from another folder: artifact locations now point at %s",
                                         repo_root() / "mlartifacts")
    mlflow.set_tracking_uri(uri)
    return mlflow


# Labels the experiment as model training (MLflow 3.17 still opens it on its GenAI overview; the README
# gives the runs-table URL)
KIND_TAG = {"mlflow.experimentKind": "custom_model_development"}


def _experiment(mlflow, name: str) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get("mlflow.experimentKind") is None:
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, *next(iter(KIND_TAG.items())))
        return exp.experiment_id
    artifacts = (repo_root() / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=artifacts, tags=KIND_TAG)


def experiment_name() -> str:
    """The DVC experiment this process runs in (`dvc exp run -n NAME`), else 'workspace'."""
    return os.environ.get("DVC_EXP_NAME") or "workspace"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.getcwd()).stdout.strip()
    except Exception:
        return "unknown"


def dvc_lock_hashes(path: str | Path = "dvc.lock") -> dict[str, str]:
    """{'dvc.<stage>.<out>': md5} of the outputs recorded in dvc.lock (what this run was built from)."""
    p = Path(path)
    if not p.exists():
        return {}
    lock = yaml.safe_load(p.read_text()) or {}
    tags = {}
    for stage, body in (lock.get("stages") or {}).items():
        for out in body.get("outs", []) or []:
            h = out.get("md5") or out.get("hash")
            if h:
                key = re.sub(r"[^\w\-. :/]", "_", f"dvc.{stage}.{Path(out['path']).name}")[:250]
                tags[key] = str(h)
    return tags


def run_file(model_dir: str | Path) -> Path:
    return Path(model_dir) / "mlflow_run.json"


def start_run(cfg, fold: int, shots: int, model_dir: str | Path, role: str = "few-shot") -> str:
    """Open a new run for this fold's ``shots``-shot model (``role='base'``: BAM's base learner, shots
    0), log params and tags, record its id next to it."""
    mlflow = _mlflow(cfg)
    exp_id = _experiment(mlflow, cfg.tracking.experiment)
    dvc_exp = experiment_name()
    what = f"base-learner-{cfg.model.backbone}" if role == "base" else f"{shots}shot-{cfg.model.head}-{cfg.model.finetune}"
    name = f"fold{fold}-{what}" + (f"-{dvc_exp}" if dvc_exp != "workspace" else "")
    with mlflow.start_run(experiment_id=exp_id, run_name=name) as run:
        flat = {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in cfg.flat().items()}
        items = list(flat.items())
        for i in range(0, len(items), 90):
            mlflow.log_params(dict(items[i:i + 90]))
        mlflow.log_params({"fold": fold, "shots": shots})
        mlflow.set_tags({"git_commit": git_commit(), "fold": str(fold), "benchmark": cfg.data.benchmark,
                         "finetune": cfg.model.finetune, "head": cfg.model.head, "shots": str(shots),
                         "dvc_experiment": dvc_exp, "role": role, **dvc_lock_hashes(),
                         **({"setting": cfg.eval.paper} if cfg.eval.paper else {})})   # the preset of the paper
        run_id = run.info.run_id
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    # no tracking URI here: this file is committed with the results and must not name a machine's paths
    run_file(model_dir).write_text(json.dumps({"run_id": run_id, "experiment_id": exp_id}) + "\n")
    return run_id


def log_summary_run(cfg, name: str, params: dict, metrics: dict, artifacts: list, tags: dict | None = None) -> str:
    """One finished run that records a study rather than a model (the regime ablation): params,
    final metrics, files. Returns its id."""
    mlflow = _mlflow(cfg)
    dvc_exp = experiment_name()
    with mlflow.start_run(experiment_id=_experiment(mlflow, cfg.tracking.experiment),
                          run_name=name + (f"-{dvc_exp}" if dvc_exp != "workspace" else "")) as run:
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in params.items()})
        mlflow.set_tags({"git_commit": git_commit(), "benchmark": cfg.data.benchmark, "head": cfg.model.head,
                         "dvc_experiment": dvc_exp, **(tags or {})})
        tracker = Tracker(mlflow, run.info.run_id)
        tracker.metrics(metrics)
        for path in artifacts:
            tracker.artifact(path)
        return run.info.run_id


@contextmanager
def resume_run(cfg, model_dir: str | Path, stage: str):
    """Reopen the fold's run (written by the train stage) for a later stage."""
    rf = run_file(model_dir)
    if not rf.exists():
        raise FileNotFoundError(f"{rf} is missing; run the train stage (`dvc repro train`) first")
    run_id = json.loads(rf.read_text())["run_id"]
    mlflow = _mlflow(cfg)
    with mlflow.start_run(run_id=run_id) as run:
        mlflow.set_tags({f"stage.{stage}": "done", **dvc_lock_hashes()})
        yield Tracker(mlflow, run.info.run_id)


@contextmanager
def evaluation_run(cfg, model_dir: str | Path):
    """The model's run for the evaluate stage while the run's logged ``eval.*`` parameters are this evaluation's;
    after a change of them (a re-evaluation), a child run of its own (tag ``mlflow.parentRunId``), with the new
    ``eval.*`` values: MLflow parameters cannot change, and a score must not sit beside settings it was not
    measured with."""
    rf = run_file(model_dir)
    if not rf.exists():
        raise FileNotFoundError(f"{rf} is missing; run the train stage (`dvc repro train`) first")
    parent = json.loads(rf.read_text())["run_id"]
    mlflow = _mlflow(cfg)
    logged = mlflow.MlflowClient().get_run(parent).data.params
    mine = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in cfg.flat().items()
            if k.startswith("eval.")}
    if all(logged.get(k) == v for k, v in mine.items()):
        with resume_run(cfg, model_dir, "evaluate") as t:
            yield t
        return
    info = mlflow.MlflowClient().get_run(parent).info
    with mlflow.start_run(experiment_id=info.experiment_id, run_name=f"{info.run_name}-reevaluated") as run:
        mlflow.log_params(mine)
        mlflow.set_tags({"mlflow.parentRunId": parent, "role": "re-evaluation", "git_commit": git_commit(),
                         **dvc_lock_hashes()})
        yield Tracker(mlflow, run.info.run_id)


class Tracker:
    """Thin handle over an active run: metrics with steps, files, folders."""

    def __init__(self, mlflow, run_id: str):
        self.mlflow, self.run_id = mlflow, run_id

    def metrics(self, values: dict, step: int | None = None) -> None:
        clean = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and v == v}
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.mlflow.log_artifacts(str(p), artifact_path=folder)
        elif p.exists():
            self.mlflow.log_artifact(str(p), artifact_path=folder)

    def tags(self, values: dict) -> None:
        self.mlflow.set_tags({k: str(v) for k, v in values.items()})


@contextmanager
def open_run(cfg, model_dir: str | Path, stage: str, enabled: bool = True):
    """``resume_run`` or, when tracking is off for this process (a non-zero DDP rank), a no-op."""
    if not enabled:
        yield None
        return
    with resume_run(cfg, model_dir, stage) as t:
        yield t


def model_alias(cfg, fold: int, shots: int) -> str:
    """Registry alias of a model: one per benchmark, fold, training shots, head and regime, so an
    ablation never moves another regime's alias."""
    return f"{cfg.data.benchmark}-fold{fold}-{shots}shot-{cfg.model.head}-{cfg.model.finetune}"


def describe_model_version(cfg, version: int | str, tags: dict, description: str | None = None) -> None:
    """Tag (and describe) a registered model version."""
    mlflow = _mlflow(cfg)
    client = mlflow.MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(cfg.tracking.registered_model, str(version), k, str(v))
    if description is not None:
        client.update_model_version(cfg.tracking.registered_model, str(version), description=description)
