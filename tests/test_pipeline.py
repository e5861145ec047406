"""The stages as users run them: processes, torchrun, DVC and MLflow for real, on a tiny synthetic set."""
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import copy_project, doc_block

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "data": {"synthetic": {"num_train": 48, "num_val": 30, "image_size": 48, "seed": 0}, "workers": 1},
    "split": {"folds": [0], "min_pixels": 20},
    "model": {"backbone": "resnet10_slim", "pretrained": "random", "reduce_dim": 16, "bins": [1.0, 0.5],
              "svf_form": "rebuild"},
    "train": {"iterations": 16, "batch_size": 2, "crop_size": 48, "checkpoint_every": 4, "val_every": 8,
              "val_episodes": 4, "log_every": 2, "workers": 0, "lr": 0.005},
    "eval": {"shots": [1, 2], "episodes": 6, "seeds": [510, 365], "test_size": 48, "figure_episodes": 2},
    # the C++ test compiles an AOTInductor package (test_cpp.py); the dynamo exporter is tested in test_export.py
    "export": {"shots": [1, 2], "parity_episodes": 2, "aoti": False, "exporter": "torchscript", "int8": True},
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


def kill_at_first_checkpoint(cmd: list, cwd: Path, ckpt: Path, sig=signal.SIGKILL) -> int:
    """Start ``cmd``, send ``sig`` once ``ckpt`` exists; the checkpoint's iteration."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(cwd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait()
    assert ckpt.exists(), "the run ended before its first checkpoint"
    return torch.load(ckpt, weights_only=True)["state"]["iteration"]


def test_sigkill_and_resume_equals_uninterrupted_run(data_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_params(a, data_root)
    params_b = write_params(b, data_root)
    stage("train", a, "--fold", "0")

    ckpt = b / "checkpoints/synthetic/fold0/1shot/checkpoint.pt"
    killed_at = kill_at_first_checkpoint([sys.executable, "-m", "stages.train", "--fold", "0"], b, ckpt)
    assert not (b / "models/fold0/1shot/adapter.pt").exists()
    assert 0 < killed_at < TINY["train"]["iterations"]

    # resuming with another config is refused and names the differing keys
    write_params(b, data_root, train__lr=0.01, model__reduce_dim=8)
    r = stage("train", b, "--fold", "0", check=False)
    assert r.returncode == 1
    assert "model.reduce_dim" in r.stderr and "train.lr" in r.stderr and "differ" in r.stderr
    assert ckpt.exists()

    write_params(b, data_root)
    r = stage("train", b, "--fold", "0")
    assert f"resuming from {ckpt.relative_to(b)} at iteration {killed_at}" in r.stderr
    ta, tb = adapter_tensors(a / "models/fold0/1shot/adapter.pt"), adapter_tensors(b / "models/fold0/1shot/adapter.pt")
    assert ta.keys() == tb.keys() and len(ta) > 0
    assert all(torch.equal(ta[k], tb[k]) for k in ta), "resumed run ended with other weights"
    assert not ckpt.exists()   # a finished run leaves no checkpoint behind
    curve = (b / "plots/fold0/1shot/train.csv").read_text().splitlines()
    assert curve == (a / "plots/fold0/1shot/train.csv").read_text().splitlines()
    assert params_b.exists()


BAM = {"model__head": "bam", "model__finetune": "svf", "train__iterations": 4, "train__val_every": 4,
       "base__iterations": 8, "base__batch_size": 2, "base__crop_size": 48, "base__checkpoint_every": 2,
       "base__val_every": 4, "base__val_images": 6, "base__log_every": 2, "base__workers": 0,
       "export__preview_size": 40}


def test_bam_base_learner_resumes_exactly_and_the_chain_runs(data_root, tmp_path):
    """BAM's base stage: SIGTERM (its MLflow run ends FAILED, not RUNNING) + resume = uninterrupted; then train,
    evaluate, merge and export the BAM+SVF model; a base learner of another backbone is refused by name."""
    a, b = tmp_path / "a", tmp_path / "b"
    write_params(a, data_root, **BAM)
    write_params(b, data_root, **BAM)
    stage("base", a, "--fold", "0")
    ckpt = b / "checkpoints/synthetic/fold0/base/checkpoint.pt"
    killed_at = kill_at_first_checkpoint([sys.executable, "-m", "stages.base", "--fold", "0"], b, ckpt, signal.SIGTERM)
    assert 0 < killed_at < BAM["base__iterations"] and not (b / "models/fold0/base/base.pt").exists()
    import mlflow
    run_id = json.loads((b / "models/fold0/base/mlflow_run.json").read_text())["run_id"]
    assert mlflow.MlflowClient(f"sqlite:///{b / 'mlflow.db'}").get_run(run_id).info.status == "FAILED"
    r = stage("base", b, "--fold", "0")
    assert f"resuming from {ckpt.relative_to(b)} at iteration {killed_at}" in r.stderr
    sa, sb = (torch.load(d / "models/fold0/base/base.pt", weights_only=True) for d in (a, b))
    assert sa["state"].keys() == sb["state"].keys() and all(torch.equal(sa["state"][k], sb["state"][k]) for k in sa["state"])
    assert sa["fingerprint"] == sb["fingerprint"] and not ckpt.exists()
    base = json.loads((a / "models/fold0/base/base.json").read_text())
    assert base["trained"] and 0 <= base["base_miou"] <= 100 and base["classes"] == 16
    assert (a / "models/fold0/base/curves.png").stat().st_size > 10_000

    # the episodes BAM trains on carry the query's base-class label
    from pipeline.config import load_config
    from pipeline.train import datasets
    cwd = os.getcwd()
    os.chdir(a)
    try:
        train_ds, _ = datasets(load_config(a / "params.yaml"), 0, 1)
    finally:
        os.chdir(cwd)
    item = train_ds[(0, 0)]
    base_ids = list(range(6, 21))
    assert item["base_class"] == base_ids.index(item["class"]) + 1
    fg = item["query_mask"] == 1
    assert bool((item["query_base"][fg] == item["base_class"]).all())
    assert set(item["query_base"].unique().tolist()) <= set(range(16)) | {255}

    for name in ("train", "evaluate", "merge", "export"):
        stage(name, a, "--fold", "0")
    out = a / "models/fold0/1shot"
    merge, export = (json.loads((out / f).read_text()) for f in ("merge.json", "export.json"))
    assert merge["passed"] and merge["svf_layers_merged"] > 0
    assert export["onnx"]["parity"]["max_rel"] < 1e-4 and export["onnx"]["split_graphs"]["parity"]["max_rel"] < 1e-4
    assert export["onnx"]["split_graphs"]["openvino_parity"]["max_rel"] < 1e-4     # the same graphs in OpenVINO
    i8 = export["int8"]                  # INT8 decoder: scored against FP32 on the same episodes, kept or set aside
    assert i8["built"] and i8["episodes"] == TINY["eval"]["episodes"] and 0 <= i8["argmax_agreement"] <= 1
    assert i8["drop"] == round(i8["fp32_miou"] - i8["int8_miou"], 2)
    assert i8["kept"] == (i8["drop"] <= 1.0) and Path(i8["file"]).name in ("query_decoder.onnx", "query_decoder.rejected.onnx")
    from export.int8 import PRECISION_KEY
    from export.onnx_export import read_metadata
    from export.openvino_session import bf16_capable
    bf = i8["bf16"]                      # bfloat16 beside INT8: measured where the CPU has it, marked in the file if kept
    assert ("miou" in bf) == bf16_capable() and bf["kept"] == (i8["kept"] and bf.get("drop", 99) <= 1.0)
    assert (read_metadata(a / i8["file"]).get(PRECISION_KEY) == "bf16") == bf["kept"]
    pv = export["preview"]               # the smaller working size: its own checked graphs, scored and timed
    assert pv["built"] and pv["size"] == 40 and pv["split_parity"] < 1e-4
    assert pv["miou_cost"] == round(pv["full_miou"] - pv["preview_miou"], 2) and pv["speedup"] > 0
    from serving.backends import OnnxBackend
    assert OnnxBackend(out / "preview").size == 40 and not (out / "preview/model.onnx").exists()
    if i8["kept"]:
        from serving.backends import load_backend
        b = load_backend(out, "openvino-int8")
        s = np.zeros((1, b.shots or 1, 3, b.size, b.size), np.float32)
        m = np.ones((1, b.shots or 1, b.size, b.size), np.float32)
        assert "INT8" in b.name and ("bfloat16" in b.name) == bf["kept"] and b.decode(np.zeros((1, 3, b.size, b.size), np.float32), b.encode(s, m)).shape[1] == 2
    ev = json.loads((out / "evaluate.json").read_text())
    assert {"1shot", "2shot_by1"} <= set(ev)
    adapter = torch.load(out / "adapter.pt", weights_only=True)
    assert not any(k.startswith("base.") for k in adapter["head"])   # the base learner stays in base.pt
    assert adapter["backbone_fingerprint"] == sa["fingerprint"]

    write_params(a, data_root, **BAM, model__backbone="resnet34")
    r = stage("evaluate", a, "--fold", "0", check=False)
    assert r.returncode == 1 and "backbone 'resnet10_slim' (expected 'resnet34')" in r.stderr and "base@0" in r.stderr
    # without its base learner, train stops before it opens an MLflow run: the previous run's record stays
    record = (out / "mlflow_run.json").read_bytes()
    (a / "models/fold0/base/base.pt").unlink()
    r = stage("train", a, "--fold", "0", check=False)
    assert r.returncode == 1 and "dvc repro base@0" in r.stderr
    assert (out / "mlflow_run.json").read_bytes() == record


def test_two_nodes_on_loopback_train_as_one(data_root, tmp_path):
    """train.nodes 2: the stage starts torchrun as node 0 (rendezvous at train.master) and prints the command for
    the other node; run here as a second process on 127.0.0.1, the two ranks stay in sync and node 0 writes."""
    from test_serving import _free_port
    d = tmp_path / "ddp"
    write_params(d, data_root, train__iterations=6, train__val_every=6, train__nodes=2,
                 train__master=f"127.0.0.1:{_free_port()}")
    log = open(tmp_path / "head.log", "w+")        # a file: a full stderr pipe would stall the rendezvous
    head = subprocess.Popen([sys.executable, "-m", "stages.train", "--fold", "0"], cwd=d, env=env(d), text=True,
                            stdout=subprocess.PIPE, stderr=log)
    seen = [""]
    while "torch.distributed.run" not in seen[-1]:
        seen.append(head.stdout.readline())
        assert seen[-1] or head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
    other = seen[-1].split()
    other[other.index("python")] = sys.executable
    other[other.index("--node_rank=N")] = "--node_rank=1"
    node1 = subprocess.run(other, cwd=d, env=env(d), capture_output=True, text=True, timeout=300)
    out = "".join(seen) + head.stdout.read()
    head.wait(300)
    err = (tmp_path / "head.log").read_text()
    assert head.returncode == 0 and node1.returncode == 0, err[-3000:] + node1.stderr[-3000:]
    assert "2 processes (1 per node x 2 node(s)); global batch 2, 1 per process" in out, out
    sums = {}
    for line in (err + node1.stderr).splitlines():
        if "finished: parameter checksum" in line:
            rank = int(line.split("rank ")[1].split()[0])
            sums[rank] = line.rsplit(" ", 1)[1]
    assert set(sums) == {0, 1} and sums[0] == sums[1], sums
    summary = json.loads((d / "models/fold0/1shot/train.json").read_text())
    assert summary["world_size"] == 2


def test_nan_loss_stops_and_names_iteration(data_root, tmp_path, monkeypatch):
    from pipeline.config import load_config
    from pipeline.train import NaNLossError, train
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write_params(tmp_path, data_root, train__lr=1e12, train__iterations=8))
    with pytest.raises(NaNLossError, match=r"at iteration \d+ \(train fold0 1-shot\).*Lower train.lr"):
        train(cfg, 0, 1, tmp_path / "models", tmp_path / "plots")
    assert not (tmp_path / "models/adapter.pt").exists()


def test_epochs_validate_each_epoch_and_patience_stops(data_root, tmp_path, monkeypatch):
    from pipeline.config import load_config
    from pipeline.data.episodes import steps_per_epoch
    from pipeline.data.split import read_pairs
    from pipeline.train import train
    monkeypatch.chdir(tmp_path)
    # LR 0: the weights never change, so the second validation cannot beat the first and patience 1 stops there
    cfg = load_config(write_params(tmp_path, data_root, train__epochs=3, train__patience=1, train__lr=0.0,
                                   train__schedule="constant", train__sampling="image"))
    summary = train(cfg, 0, 1, tmp_path / "models", tmp_path / "plots")
    images = len({i for i, _ in read_pairs(data_root / "splits/synthetic/fold0/train.jsonl")})
    steps = steps_per_epoch(images, cfg.train.batch_size)
    assert summary["stopped_early"] and summary["iterations"] == 2 * steps and summary["planned_iterations"] == 3 * steps
    val = (tmp_path / "plots/val.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in val] == [steps, 2 * steps]
    lrs = {r.split(",")[4] for r in (tmp_path / "plots/train.csv").read_text().splitlines()[1:]}
    assert lrs == {"0.0"}


def test_missing_splits_name_the_stage(tmp_path):
    write_params(tmp_path, tmp_path / "nodata")
    r = stage("train", tmp_path, "--fold", "0", check=False)
    assert r.returncode == 1 and "dvc repro split" in r.stderr
    r = stage("evaluate", tmp_path, "--fold", "0", check=False)
    assert r.returncode == 1 and "adapter" in r.stderr and "dvc repro train@0-1" in r.stderr
    # a fold that split.folds does not list: say what to change, not a command that builds nothing
    r = stage("evaluate", tmp_path, "--fold", "1", check=False)
    assert r.returncode == 1 and "add 1 to split.folds" in r.stderr and "dvc repro train@1-1" in r.stderr
    r = stage("evaluate", tmp_path, "--fold", "0", "--shot", "5", check=False)
    assert r.returncode == 1 and "add 5 to train.shots" in r.stderr and "dvc repro train@0-5" in r.stderr
    assert "Traceback" not in r.stderr
    r = stage("evaluate", tmp_path, "--help")
    assert r.stdout.startswith("usage: python -m stages.evaluate")


def test_invalid_parameter_names_the_key(tmp_path):
    write_params(tmp_path)
    text = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text.replace("finetune: svf", "finetune: bogus"))
    r = stage("validate", tmp_path, check=False)
    assert r.returncode == 1 and "model.finetune: 'bogus' is not one of ['frozen', 'svf', 'full']" in r.stderr
    assert not (tmp_path / "data/params.ok").exists()
    (tmp_path / "params.yaml").write_text(text.replace("benchmark: synthetic", "benchmark: folder")
                                          .replace("root: examples/folder", "root: nowhere"))
    r = stage("validate", tmp_path, check=False)
    assert r.returncode == 1 and "data.folder.root: nowhere is not a folder" in r.stderr
    write_params(tmp_path, data__benchmark="pascal", data__local="nowhere")
    r = stage("validate", tmp_path, check=False)
    assert r.returncode == 1 and "data.local: nowhere is not a folder" in r.stderr
    (tmp_path / "params.yaml").write_text(text)
    stage("validate", tmp_path)
    assert json.loads((tmp_path / "data/params.ok").read_text())["valid"] is True


def output_files(proj: Path) -> dict[str, bytes]:
    """Every file the pipeline wrote (DVC-cached or git-tracked outputs), with its content."""
    files = {}
    for folder in ("models", "metrics", "plots"):
        for f in (proj / folder).rglob("*"):
            if f.is_file():
                files[str(f.relative_to(proj))] = f.read_bytes()
    files["dvc.lock"] = (proj / "dvc.lock").read_bytes()
    return files


def test_dvc_repro_end_to_end_with_mlflow(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    copy_project(proj)
    write_params(proj, export__int8=False)   # train.shots [1], eval.shots [1, 2]: the 2-shot episodes are the 1-shot
    #                                          model's; the INT8 decoder is tested on the BAM chain
    e = env(proj)
    e.pop("MLFLOW_TRACKING_URI")          # the default: a SQLite file at the project root
    e.pop("PYTHONPATH")
    e.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")

    def sh(*cmd, timeout=600, ok=True, cwd=proj):
        r = subprocess.run(list(cmd), cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
        if ok:
            assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
        return r.stdout + r.stderr if ok else r

    git = ("git", "-c", "user.email=t@t", "-c", "user.name=t")
    sh("git", "init", "-q")
    sh(*git, "add", "-A")
    sh(*git, "commit", "-qm", "tiny")
    sh(str(BIN / "dvc"), "repro")
    for f in ("adapter.pt", "merged.pt", "model.onnx", "triton/svf_fss/config.pbtxt", "triton/svf_fss_query_decoder/config.pbtxt"):
        assert (proj / f"models/fold0/1shot/{f}").exists(), f
    for f in ("episodes/1shot.png", "episodes/2shot.png", "curves.png"):
        assert (proj / f"plots/fold0/1shot/{f}").exists(), f
    evaluated = json.loads((proj / "models/fold0/1shot/evaluate.json").read_text())
    assert evaluated["1shot"]["model_shots"] == evaluated["2shot_by1"]["model_shots"] == 1
    assert torch.load(proj / "models/fold0/1shot/adapter.pt", weights_only=True)["shots"] == 1
    assert (proj / "metrics/fold0.json").exists() and (proj / "plots/fold0/per_class_iou.png").exists()
    again = sh(str(BIN / "dvc"), "repro")            # validate runs each time (it hashes the files params name)
    assert re.findall(r"Running stage '([^']+)'", again) == ["validate"], again
    if not torch.cuda.is_available():      # a device this machine lacks: refused before DVC removes the model
        params = (proj / "params.yaml").read_text()
        model = {f: (proj / "models/fold0/1shot" / f).read_bytes() for f in ("adapter.pt", "train.json")}
        (proj / "params.yaml").write_text(params.replace("\n  device: auto", "\n  device: cuda", 1))
        r = sh(str(BIN / "dvc"), "repro", ok=False)
        assert r.returncode != 0 and "device: cuda but this machine has 0 CUDA device(s)" in r.stdout + r.stderr
        assert model == {f: (proj / "models/fold0/1shot" / f).read_bytes() for f in model}
        (proj / "params.yaml").write_text(params)

    # the metrics table fits a terminal, parity survives DVC's rounding
    shown = sh(str(BIN / "dvc"), "metrics", "show")
    width = max(len(line) for line in shown.splitlines())
    assert "1shot.miou" in shown and "2shot_by1.fbiou" in shown and "parity" in shown and width <= 125, shown
    metrics = json.loads((proj / "metrics/fold0.json").read_text())
    assert set(metrics) == {"1shot", "2shot_by1", "parity"} and metrics["parity"] >= 4   # relative error <= 1e-4

    # an invalid parameter stops `dvc repro` before any output is removed
    before = output_files(proj)
    params = (proj / "params.yaml").read_text()
    (proj / "params.yaml").write_text(params.replace("  iterations: 16", "  iteratons: 16"))
    r = sh(str(BIN / "dvc"), "repro", ok=False)
    assert r.returncode != 0 and "train.iteratons" in r.stdout + r.stderr
    assert output_files(proj) == before
    (proj / "params.yaml").write_text(params)
    r = sh(str(BIN / "dvc"), "exp", "run", "-S", "model.finetune=bogus", ok=False)
    assert r.returncode != 0 and "model.finetune: 'bogus' is not one of" in r.stdout + r.stderr
    assert output_files(proj) == before
    sh("git", "checkout", "--", "params.yaml")

    # the README's experiment sequence keeps the baseline and shows both regimes side by side
    for cmd in doc_block("experiments"):
        sh("bash", "-c", cmd)
    import csv
    import io
    r = subprocess.run([str(BIN / "dvc"), "exp", "show", "--csv"], cwd=proj, env=e, capture_output=True, text=True)
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    miou = next(c for c in rows[0] if c.endswith("1shot.miou"))
    regime = next(c for c in rows[0] if c.endswith("model.finetune"))
    shown = {(row["Experiment"] or row["rev"], row[regime]): float(row[miou]) for row in rows
             if row.get(miou) not in (None, "", "!", "-")}
    assert {"svf", "frozen"} <= {k[1] for k in shown}, rows
    assert any(name == "frozen" for name, _ in shown), rows
    assert json.loads((proj / "metrics/fold0.json").read_text()) == metrics, "the workspace lost the baseline"
    compare = next(c for c in doc_block("compare") if c.startswith("dvc exp show"))
    table = sh("bash", "-c", compare)
    assert "frozen" in table and "svf" in table
    assert max(len(line) for line in table.splitlines()) <= 125, table

    # MLflow: one run per execution tagged with its DVC experiment, aliases per regime, described versions
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    run_id = json.loads((proj / "models/fold0/1shot/mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.data.params["model.finetune"] == "svf" and run.data.params["train.iterations"] == "16"
    assert {"1shot_miou", "2shot_by1_miou", "onnx_max_rel"} <= set(run.data.metrics)
    assert run.data.tags["git_commit"] != "unknown" and any(k.startswith("dvc.") for k in run.data.tags)
    assert run.data.tags["dvc_experiment"] == "workspace" and run.data.tags["latency_busy"] in ("True", "False")
    loss = client.get_metric_history(run_id, "loss")
    assert len(loss) >= 4 and sorted(m.step for m in loss) == [m.step for m in loss]
    arts = {a.path for folder in ("train", "evaluate", "merge", "export", "report")
            for a in client.list_artifacts(run_id, folder)}
    assert {"train/adapter.pt", "train/curves.png", "evaluate/evaluate.json", "merge/merge.json",
            "export/export.json", "report/fold0.json"} <= arts
    svf = client.get_model_version_by_alias("svf-fss-pfenet", "synthetic-fold0-1shot-pfenet-svf")
    frozen = client.get_model_version_by_alias("svf-fss-pfenet", "synthetic-fold0-1shot-pfenet-frozen")
    assert float(svf.tags["2shot_by1_miou"]) == metrics["2shot_by1"]["miou"] and svf.tags["shots"] == "1"
    assert svf.run_id == run_id and frozen.version != svf.version
    assert svf.tags["finetune"] == "svf" and frozen.tags["finetune"] == "frozen" and svf.tags["fold"] == "0"
    assert float(svf.tags["1shot_miou"]) == metrics["1shot"]["miou"] and "parity_digits" in svf.tags
    assert "svf regime" in svf.description
    frozen_run = client.get_run(frozen.run_id)
    assert frozen_run.data.tags["dvc_experiment"] == "frozen"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == (proj / "mlartifacts").as_uri()

    # a copied project writes its artifacts into its own mlartifacts/, not the original's
    copy = tmp_path / "copy"
    shutil.copytree(proj, copy, symlinks=True)
    original = sorted(p.relative_to(proj) for p in (proj / "mlartifacts").rglob("*"))
    sh(sys.executable, "-m", "stages.report", "--fold", "0", cwd=copy)
    assert sorted(p.relative_to(proj) for p in (proj / "mlartifacts").rglob("*")) == original
    moved = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}").get_run(run_id)
    assert moved.info.artifact_uri.startswith((copy / "mlartifacts").as_uri())
    assert (copy / "mlartifacts").is_dir() and any((copy / "mlartifacts").rglob("fold0.json"))

    # the regime ablation (README: `make ablation`): same episodes for every regime, table, figure, MLflow run
    out = sh(sys.executable, "-m", "stages.ablation", "--regimes", "frozen", "svf")
    res = json.loads((proj / "results/ablation/fold0/ablation.json").read_text())
    assert list(res["regimes"]) == ["frozen", "svf"] and set(res["regimes"]["svf"]) >= {"1shot", "2shot_by1"}
    assert res["regimes"]["frozen"]["trainable_backbone_params"] == 0 < res["regimes"]["svf"]["trainable_backbone_params"]
    for k in ("1shot", "2shot_by1"):
        d = res["differences"][k]["svf - frozen"]
        svf, frozen = res["regimes"]["svf"][k], res["regimes"]["frozen"][k]
        assert d["mean"] == pytest.approx(svf["miou"] - frozen["miou"], abs=0.02)
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
        assert len(svf["per_eval_seed"][0]) == 2            # eval.seeds of TINY
    assert "svf - frozen" in out and (proj / "results/ablation/fold0/ablation.png").stat().st_size > 10_000
    assert "| svf |" in (proj / "results/ablation/fold0/ablation.md").read_text()
    runs = client.search_runs([run.info.experiment_id], "tags.role = 'ablation'")
    assert len(runs) == 1 and "svf_1shot_miou" in runs[0].data.metrics
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {"ablation.json", "ablation.md",
                                                                            "ablation.png"}

    # your own data (README "Your own data"): the example folder through the whole chain as an experiment
    for cmd in doc_block("own-data"):
        out = sh("bash", "-c", cmd)
    assert len((proj / "my_data/classes.txt").read_text().split()) == 6
    report = json.loads((proj / "data/prepared/folder/class_report.json").read_text())
    assert [r["name"] for r in report] == ["disc", "square", "triangle", "star", "cross", "ring"]
    assert json.loads((proj / "models/fold0/1shot/export.json").read_text())["onnx"]["parity"]["max_rel"] <= 1e-4
    own = json.loads((proj / "models/fold0/1shot/evaluate.json").read_text())
    assert own["benchmark"] == "folder" and set(own["1shot"]["per_class_iou"]) == {"disc"}
    assert (proj / "models/fold0/1shot/model.onnx").exists() and "own-data" in sh(str(BIN / "dvc"), "exp", "show")

    # train.devices 2: `dvc repro` itself trains in two processes (gloo on the CPU) and records the result
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"]["devices"] = 2
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    out = sh(str(BIN / "dvc"), "repro", "train@0-1")
    assert f"train: 2 processes (2 per node x 1 node(s)); global batch {params['train']['batch_size']}" in out, out
    assert json.loads((proj / "models/fold0/1shot/train.json").read_text())["world_size"] == 2
    assert "train@0-1" not in sh(str(BIN / "dvc"), "status", "train@0-1")


def test_missing_pretrained_weights_name_the_stage(tmp_path):
    from pipeline.models.backbone import load_backbone
    with pytest.raises(FileNotFoundError, match=r"dvc repro pretrain"):
        load_backbone("resnet18", "synthetic", weights_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="model.pretrained: checkpoint .* does not exist"):
        load_backbone("resnet18", str(tmp_path / "nope.pth"))


def test_a_reevaluation_with_other_settings_gets_a_child_run(tmp_path):
    """The evaluate stage logs into the model's run while its eval.* parameters are the run's; with others (a
    re-evaluation) into a child run carrying them, so no score sits beside settings it was not measured with."""
    import mlflow

    from pipeline import tracking
    from pipeline.config import load_config
    cfg = load_config({"tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "t"}})
    parent = tracking.start_run(cfg, 0, 1, tmp_path)
    with tracking.evaluation_run(cfg, tmp_path) as t:
        assert t.run_id == parent
    cfg.eval.episodes = 7
    with tracking.evaluation_run(cfg, tmp_path) as t:
        child = t.run_id
        t.metrics({"1shot_miou": 50.0})
    run = mlflow.MlflowClient(cfg.tracking.uri).get_run(child)
    assert child != parent and run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.params["eval.episodes"] == "7" and run.data.metrics["1shot_miou"] == 50.0
