"""The stages as users run them: processes, torchrun, DVC and MLflow for real, on a tiny synthetic set."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "data": {"synthetic": {"num_train": 48, "num_val": 30, "image_size": 48, "seed": 0}, "workers": 1},
    "split": {"folds": [0], "min_pixels": 20},
    "model": {"backbone": "resnet18", "pretrained": "random", "reduce_dim": 16, "bins": [1.0, 0.5],
              "svf_form": "rebuild"},
    "train": {"iterations": 16, "batch_size": 2, "crop_size": 48, "checkpoint_every": 4, "val_every": 8,
              "val_episodes": 4, "log_every": 2, "workers": 0, "lr": 0.005},
    "eval": {"shots": [1, 2], "episodes": 6, "seeds": [510, 365], "test_size": 48, "figure_episodes": 2},
    "export": {"shots": [1, 2], "parity_episodes": 2},
}


def env(tmp: Path, **extra) -> dict:
    e = dict(os.environ)
    e.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
             PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}", PYTHONUNBUFFERED="1", **extra)
    return e


def write_params(d: Path, data_root: Path | None = None, **overrides) -> Path:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())   # every key, as dvc.yaml's templates need
    for section, values in TINY.items():
        for k, v in values.items():
            p[section][k] = {**p[section][k], **v} if isinstance(v, dict) else v
    if data_root is not None:
        p["data"]["root"] = str(data_root)
    for key, value in overrides.items():
        section, name = key.split("__")
        p[section][name] = value
    d.mkdir(parents=True, exist_ok=True)
    (d / "params.yaml").write_text(yaml.safe_dump(p))
    return d / "params.yaml"


def stage(name: str, cwd: Path, *args, check=True, timeout=300):
    r = subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=cwd, env=env(cwd), capture_output=True,
                       text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"stage {name} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep")
    write_params(d)
    for s in ("download", "prepare", "split"):
        stage(s, d)
    return d / "data"


def adapter_tensors(path: Path) -> dict:
    a = torch.load(path, weights_only=True)
    return {**a["head"], **a["backbone"]}


def test_sigkill_and_resume_equals_uninterrupted_run(data_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_params(a, data_root)
    params_b = write_params(b, data_root)
    stage("train", a, "--fold", "0")

    ckpt = b / "checkpoints/synthetic/fold0/checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-m", "stages.train", "--fold", "0"], cwd=b, env=env(b),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the run ended before its first checkpoint"
    assert not (b / "models/fold0/adapter.pt").exists()
    killed_at = torch.load(ckpt, weights_only=True)["iteration"]
    assert 0 < killed_at < TINY["train"]["iterations"]

    # resuming with another config is refused and names the differing keys
    write_params(b, data_root, train__lr=0.01, model__reduce_dim=8)
    r = stage("train", b, "--fold", "0", check=False)
    assert r.returncode == 1
    assert "model.reduce_dim" in r.stderr and "train.lr" in r.stderr and "differ" in r.stderr
    assert ckpt.exists()

    write_params(b, data_root)
    r = stage("train", b, "--fold", "0")
    assert f"resuming fold 0 from {ckpt.relative_to(b)} at iteration {killed_at}" in r.stderr
    ta, tb = adapter_tensors(a / "models/fold0/adapter.pt"), adapter_tensors(b / "models/fold0/adapter.pt")
    assert ta.keys() == tb.keys() and len(ta) > 0
    assert all(torch.equal(ta[k], tb[k]) for k in ta), "resumed run ended with other weights"
    assert not ckpt.exists()   # a finished run leaves no checkpoint behind
    curve = (b / "plots/fold0/train.csv").read_text().splitlines()
    assert curve == (a / "plots/fold0/train.csv").read_text().splitlines()
    assert params_b.exists()


def test_ddp_two_cpu_processes_stay_in_sync(data_root, tmp_path):
    d = tmp_path / "ddp"
    write_params(d, data_root, train__iterations=6, train__val_every=6)
    r = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "stages.train",
                        "--fold", "0"], cwd=d, env=env(d), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    sums = {}
    for line in r.stderr.splitlines():
        if "finished: parameter checksum" in line:
            rank = int(line.split("rank ")[1].split()[0])
            sums[rank] = line.rsplit(" ", 1)[1]
    assert set(sums) == {0, 1} and sums[0] == sums[1]
    summary = json.loads((d / "models/fold0/train.json").read_text())
    assert summary["world_size"] == 2


def test_nan_loss_stops_and_names_iteration(data_root, tmp_path, monkeypatch):
    from pipeline.config import load_config
    from pipeline.train import NaNLossError, train
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write_params(tmp_path, data_root, train__lr=1e12, train__iterations=8))
    with pytest.raises(NaNLossError, match=r"at iteration \d+ \(fold 0\)"):
        train(cfg, 0, tmp_path / "models", tmp_path / "plots")
    assert not (tmp_path / "models/adapter.pt").exists()


def test_missing_splits_name_the_stage(tmp_path):
    write_params(tmp_path, tmp_path / "nodata")
    r = stage("train", tmp_path, "--fold", "0", check=False)
    assert r.returncode == 1 and "dvc repro split" in r.stderr
    r = stage("evaluate", tmp_path, "--fold", "0", check=False)
    assert r.returncode == 1 and "adapter" in r.stderr and "dvc repro train" in r.stderr


def _copy_project(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    outputs = ("data/", "models/", "metrics/", "plots/", "checkpoints/", "mlartifacts/", "dvc.lock")
    for f in filter(None, files):
        if f.startswith(outputs):          # results of this checkout's own runs stay behind
            continue
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def test_dvc_repro_end_to_end_with_mlflow(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    _copy_project(proj)
    write_params(proj)
    e = env(proj)
    e.pop("MLFLOW_TRACKING_URI")          # the default: a SQLite file at the project root
    e.pop("PYTHONPATH")

    def sh(*cmd, timeout=600):
        r = subprocess.run(list(cmd), cwd=proj, env=e, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
        return r.stdout + r.stderr

    sh("git", "init", "-q")
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny")
    sh(str(BIN / "dvc"), "repro")
    for f in ("models/fold0/adapter.pt", "models/fold0/merged.pt", "models/fold0/model.onnx", "metrics/fold0.json",
              "plots/fold0/episodes_1shot.png", "models/fold0/triton/svf_fss_onnx/config.pbtxt"):
        assert (proj / f).exists(), f
    assert "up to date" in sh(str(BIN / "dvc"), "repro").lower()
    shown = sh(str(BIN / "dvc"), "metrics", "show")
    assert "1shot.miou" in shown and "1shot.fbiou" in shown

    export = json.loads((proj / "models/fold0/export.json").read_text())
    assert export["onnx"]["parity"]["max_rel"] <= 1e-4
    assert export["tensorrt"]["built"] is False and export["tensorrt"]["reason"]
    merge = json.loads((proj / "models/fold0/merge.json").read_text())
    assert merge["passed"] and merge["svf_layers_merged"] > 0

    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    run_id = json.loads((proj / "models/fold0/mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.data.params["model.finetune"] == "svf" and run.data.params["train.iterations"] == "16"
    assert "1shot_miou" in run.data.metrics and "onnx_max_rel" in run.data.metrics
    assert run.data.tags["git_commit"] != "unknown" and any(k.startswith("dvc.") for k in run.data.tags)
    loss = client.get_metric_history(run_id, "loss")
    assert len(loss) >= 4 and sorted(m.step for m in loss) == [m.step for m in loss]
    arts = {a.path for folder in ("train", "evaluate", "merge", "export") for a in client.list_artifacts(run_id, folder)}
    assert {"train/adapter.pt", "evaluate/fold0.json", "merge/merge.json", "export/export.json"} <= arts
    mv = client.get_model_version_by_alias("svf-fss-pfenet", "synthetic-fold0")
    assert mv.run_id == run_id

    # the ablation is one experiment away, beside the committed baseline, in the same MLflow database
    sh("git", "add", "-A")
    sh("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline results")
    sh(str(BIN / "dvc"), "exp", "run", "-S", "model.finetune=frozen")
    import csv
    import io
    r = subprocess.run([str(BIN / "dvc"), "exp", "show", "--csv"], cwd=proj, env=e, capture_output=True, text=True)
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    miou = next(c for c in rows[0] if c.endswith("1shot.miou"))
    regime = next(c for c in rows[0] if c.endswith("model.finetune"))
    shown = {row[regime]: float(row[miou]) for row in rows if row.get(miou) not in (None, "", "!")}
    assert {"svf", "frozen"} <= set(shown), rows
    runs = client.search_runs([run.info.experiment_id])
    assert {r.data.params["model.finetune"] for r in runs} == {"svf", "frozen"}


def test_missing_pretrained_weights_name_the_stage(tmp_path):
    from pipeline.models.backbone import load_backbone
    with pytest.raises(FileNotFoundError, match=r"dvc repro pretrain"):
        load_backbone("resnet18", "synthetic", weights_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="model.pretrained: checkpoint .* does not exist"):
        load_backbone("resnet18", str(tmp_path / "nope.pth"))
