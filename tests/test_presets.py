"""Each preset carries the reference values of the setting it reproduces (a table taken from the authors' configs):
the SVF paper's 24 settings (3 heads x 2 backbones x 2 benchmarks x frozen / + SVF), each with its published mIoU."""
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]

# zechao-li/SVF-few-shot-segmentation config/{pascal,coco}/*_split0_resnet50.yaml, train_pfenet.py, model/pfenet.py,
# util/util.py, util/dataset.py; BAM's test.py for the evaluation
COMMON = {
    "model.head": "pfenet", "model.backbone": "resnet50_deep", "model.output_stride": 8,
    "model.dilation": "torchvision", "model.reduce_dim": 256, "model.bins": [60, 30, 15, 8],
    "train.batch_size": 8, "train.shots": [1, 5], "train.sampling": "image", "train.patience": 75,
    "train.backbone_lr_scale": 0.1, "train.optimizer": "sgd", "train.hue_jitter": 0.0, "train.momentum": 0.9, "train.weight_decay": 1e-4, "train.poly_power": 0.9,
    "train.aux_weight": 1.0, "train.rotate": 10.0, "train.seed": 321, "train.amp": False, "train.val_episodes": 1000,
    "split.min_pixels": 2048, "split.filter": "bam", "split.folds": [0, 1, 2, 3],
    "eval.protocol": "bam", "eval.shots": [1, 5], "eval.episodes": 1000, "eval.seeds": [510, 365, 382, 322, 988],
}
DATA = {
    "pascal": {"data.benchmark": "pascal", "train.crop_size": 473, "eval.test_size": 473, "train.scale": [0.9, 1.1],
               "train.epochs": 200},
    "coco": {"data.benchmark": "coco", "data.coco_split": "interleaved", "train.crop_size": 641,
             "eval.test_size": 641, "train.scale": [0.8, 1.25], "train.epochs": 50},
}
REGIME = {
    # svf: base_lr 0.015, S at LR/10, LR constant (the per-iteration CosineAnnealingLR never decays)
    "svf": {"model.finetune": "svf", "train.lr": 0.015, "train.schedule": "constant"},
    # frozen (svf: False): poly_learning_rate multiplies base_lr 0.015 by 10 on every group
    "frozen": {"model.finetune": "frozen", "train.lr": 0.15, "train.schedule": "poly"},
}
PRESETS = {f"{b}_pfenet_{r}": {**COMMON, **DATA[b], **REGIME[r]} for b in DATA for r in REGIME}

# chunbolang/BAM config/{pascal,coco}/*_split0_resnet50{,_base}.yaml, model/BAM.py, model/PSPNet.py; the SVF
# authors' BAM variant (model/BAM.py, train_BAM.py) for svf
BAM = {**COMMON, "model.head": "bam", "model.dilation": "pspnet", "model.kshot_dim": 2,
       "base.patience": 75, "base.batch_size": 12, "base.lr": 0.0025, "base.schedule": "poly", "base.optimizer": "sgd",
       "base.momentum": 0.9,
       "base.weight_decay": 1e-4, "base.poly_power": 0.9, "base.crop_size": 417, "base.scale": [0.5, 2.0],
       "base.rotate": 10.0, "base.seed": 321, "base.sync_bn": True}
BAM_DATA = {"pascal": {"base.epochs": 100, "base.backbone_lr_scale": 0.1},   # index_split 0
            "coco": {"base.epochs": 20, "base.backbone_lr_scale": 1.0}}      # index_split -1
BAM_REGIME = {"svf": REGIME["svf"],
              # BAM's meta stage: base_lr 0.005 x 10 on every group, poly
              "frozen": {"model.finetune": "frozen", "train.lr": 0.05, "train.schedule": "poly"}}
PRESETS.update({f"{b}_bam_{r}": {**BAM, **DATA[b], **BAM_DATA[b], **BAM_REGIME[r]} for b in DATA for r in BAM_REGIME})
# the baseline: model/aspp.py trained by train_aspp.py on the same configs as PFENet (no pyramid, no auxiliary loss)
BASELINE = {k: v for k, v in COMMON.items() if k != "model.bins"} | {"model.head": "baseline",
                                                                    "model.baseline_quirks": "authors"}
PRESETS.update({f"{b}_baseline_{r}": {**BASELINE, **DATA[b], **REGIME[r]} for b in DATA for r in REGIME})
# VGG-16: the same settings on vgg16_bn (config/*_vgg.yaml differ from *_resnet50.yaml only in vgg: True), no dilation
VGG = {"model.backbone": "vgg16_bn", "model.pretrained": "initmodel/vgg16_bn.pth"}
PRESETS.update({f"{n}_vgg": {k: v for k, v in p.items() if k not in ("model.dilation", "model.output_stride")} | VGG
                for n, p in list(PRESETS.items())})
for _name, _p in PRESETS.items():
    _p["eval.paper"] = _name
# the means printed in the paper's tables, against which the transcribed folds (pipeline/paper.py) are checked
MEANS = {"pascal_baseline_frozen_vgg": (60.15, 65.44), "pascal_baseline_svf_vgg": (62.89, 68.34),
         "pascal_pfenet_frozen_vgg": (63.35, 69.36), "pascal_pfenet_svf_vgg": (64.33, 69.80),
         "pascal_bam_frozen_vgg": (64.41, 68.76), "pascal_bam_svf_vgg": (64.87, 69.11),
         "pascal_baseline_frozen": (65.07, 69.41), "pascal_baseline_svf": (67.14, 71.42),
         "pascal_pfenet_frozen": (66.35, 71.20), "pascal_pfenet_svf": (68.15, 71.82),
         "pascal_bam_frozen": (67.81, 70.91), "pascal_bam_svf": (68.95, 72.28),
         "coco_baseline_frozen_vgg": (37.43, 45.81), "coco_baseline_svf_vgg": (38.26, 47.16),
         "coco_pfenet_frozen_vgg": (41.97, 48.36), "coco_pfenet_svf_vgg": (42.24, 49.49),
         "coco_bam_frozen_vgg": (43.50, 49.34), "coco_bam_svf_vgg": (43.76, 49.07),
         "coco_baseline_frozen": (41.84, 51.93), "coco_baseline_svf": (43.72, 52.89),
         "coco_pfenet_frozen": (46.05, 54.17), "coco_pfenet_svf": (48.02, 54.38),
         "coco_bam_frozen": (46.23, 51.16), "coco_bam_svf": (48.47, 53.87)}


def test_every_preset_is_in_the_table_and_the_paper():
    from pipeline.paper import PUBLISHED, compare
    assert len(PRESETS) == 24 and {p.stem for p in (ROOT / "presets").glob("*.yaml")} == set(PRESETS)
    assert set(PUBLISHED) == set(PRESETS) == set(MEANS)
    for name, (source, one, five) in PUBLISHED.items():
        assert len(one) == len(five) == 4
        assert abs(sum(one) / 4 - MEANS[name][0]) < 0.006 and abs(sum(five) / 4 - MEANS[name][1]) < 0.006, name
        assert ("+SVF" in source) == ("_svf" in name) and ("VGG" in source) == name.endswith("_vgg")
    got = compare("pascal_pfenet_svf", 2, {"1shot": {"miou": 68.0}, "5shot_by1": {"miou": 70.0}, "parity": 6.3})
    assert got == {"1shot": {"measured": 68.0, "paper": 67.49, "difference": 0.51}}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_has_the_reference_values(name):
    flat = load_config(ROOT / "presets" / f"{name}.yaml").flat()
    wrong = {k: (flat[k], v) for k, v in PRESETS[name].items() if flat[k] != v}
    assert not wrong, f"{name}: (preset, reference) {wrong}"
    text = (ROOT / "presets" / f"{name}.yaml").read_text()
    assert "zechao-li/SVF-few-shot-segmentation" in text and "BAM test.py" in text
    assert ("chunbolang/BAM" in text) == ("_bam_" in name)
    assert ("_resnet50" in text) != name.endswith("_vgg") and f"PRESET={name} " in text


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """One copy of the checkout, a git repository as a user's clone is, shared by the DVC checks below."""
    import subprocess
    from conftest import copy_project
    proj = tmp_path_factory.mktemp("presets")
    copy_project(proj)
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    return proj


def _run(proj, *cmd):
    import os
    import subprocess
    import sys
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(proj))
    return subprocess.run([str(bin_dir / cmd[0]) if cmd[0] in ("dvc", "python") else cmd[0], *cmd[1:]], cwd=proj,
                          env=env, capture_output=True, text=True, timeout=300)


def test_every_preset_parses_and_dvc_repro_dry_lists_every_stage(project, monkeypatch):
    """The README's way of choosing a preset (`make repro PRESET=<name>`: stages.preset, then dvc repro) gets
    past DVC's parse and plans the whole graph: base + train/evaluate/merge/export per fold and shot, report.
    DVC runs in this process (0.7 s a preset, against 2.9 s for the `dvc` command); the command itself is run
    by the default's end-to-end test."""
    from dvc.repo import Repo

    from stages.preset import render
    monkeypatch.chdir(project)      # DVC resolves the graph's paths from the working directory
    counts = {}
    for name in sorted(PRESETS):
        (project / "params.yaml").write_text(render(name, ROOT / "presets"))
        assert load_config(project / "params.yaml").flat() == load_config(ROOT / "presets" / f"{name}.yaml").flat()
        with Repo(".") as repo:    # `dvc repro --dry --force`: plain --dry stops at a missing dep (DVC 3.67)
            ran = {stage.addressing for stage in repo.reproduce(dry=True, force=True)}
        folds, shots = PRESETS[name]["split.folds"], PRESETS[name]["train.shots"]
        expected = {"validate", "download", "weights", "pretrain", "prepare", "split", "summary"}
        expected |= {f"{s}@{f}-{k}" for s in ("train", "evaluate", "merge", "export") for f in folds for k in shots}
        expected |= {f"{s}@{f}" for s in ("base", "report") for f in folds}
        assert ran == expected, f"{name}: planned {sorted(ran)}, expected {sorted(expected)}"
        counts[name] = len(ran)
    r = _run(project, "python", "-m", "stages.preset", "pascal_bam_svf")   # the command itself, as make runs it
    assert r.returncode == 0 and "params.yaml.bak" in r.stdout, r.stdout + r.stderr
    assert load_config(project / "params.yaml").flat() == load_config(ROOT / "presets/pascal_bam_svf.yaml").flat()
    print("dvc repro --dry stages per preset:", counts)
    assert set(counts.values()) == {6 + 4 + 4 * 2 * 4 + 4 + 1}


def test_a_bad_preset_is_named_and_params_yaml_is_kept(project):
    before = (project / "params.yaml").read_text()
    (project / "presets" / "typo.yaml").write_text("model:\n  backbon: resnet50\n")
    try:
        r = _run(project, "python", "-m", "stages.preset", "typo")
        assert r.returncode != 0 and "model.backbon" in r.stderr and "presets/typo.yaml" in r.stderr, r.stderr
        r = _run(project, "python", "-m", "stages.preset", "coco_pfenet_sfv")
        assert r.returncode != 0 and "did you mean coco_pfenet_svf" in r.stderr, r.stderr
    finally:
        (project / "presets" / "typo.yaml").unlink()
    assert (project / "params.yaml").read_text() == before
    assert not (project / "params.yaml.tmp").exists()


# ------------------------------------------------------------------ a preset through the whole chain
# One preset per real benchmark, the two backbones between them: VGG-16 on PASCAL, ResNet-50 on COCO (59 s and 66 s
# alone on the 2-core machine; the cost is each stage's start and three backbone-sized ONNX graphs through DVC's
# cache and MLflow, not the miniature's few images).
DOC_PRESET = "pascal_baseline_frozen_vgg"


@pytest.mark.parametrize("preset", [DOC_PRESET])   # COCO's miniature and a ResNet-50 the same way: 61 s more
def test_a_preset_runs_end_to_end_on_a_miniature(preset, tmp_path):
    """docs/paper.md's rehearsal (`make rehearse PRESET=...`, stages/rehearse.py) of a preset on a miniature of its
    benchmark, through train, evaluate (the comparison with the paper printed before the export), merge, export,
    report and summary. The miniature's archives (one block of a class per
    64 px image, two novel and three base classes of fold 0 in two images each) are fetched from 127.0.0.1 by
    the download code; since their checksums are not the real archives', the stage's output is then committed
    as done (`dvc commit download`, what a user with the data already on disk does) rather than run by DVC."""
    import json

    from conftest import doc_block
    from pipeline.paper import PUBLISHED
    from stages.rehearse import Shell, rehearse

    assert doc_block("preset-small") == [f"make rehearse PRESET={DOC_PRESET}"]
    said = []
    r = rehearse(preset, tmp_path / "proj", say=said.append)
    proj, sh, cfg = r["project"], Shell(r["project"]), load_config(r["project"] / "params.yaml")
    bench = cfg.data.benchmark
    out = "\n".join(said)
    for f in ("adapter.pt", "merged.pt", "model.onnx", "support_encoder.onnx", "export.json"):
        assert (proj / "models/fold0/1shot" / f).exists(), f
    metrics = r["metrics"]
    published = PUBLISHED[preset][1][0]          # fold 0, 1-shot
    assert metrics["paper"]["1shot"]["paper"] == published
    assert metrics["paper"]["1shot"]["difference"] == round(metrics["1shot"]["miou"] - published, 2)
    assert metrics["parity"] >= 4
    # the comparison is printed before the export starts
    assert out.index(f"the paper {published:.2f}") < out.index("merge, export, report, summary")
    onnx = json.loads((proj / "models/fold0/1shot/export.json").read_text())["onnx"]
    assert onnx["exporter"] == "torchscript" and "fallback" not in onnx
    folds = r["summary"]                                   # the summary: one fold, labelled as such
    assert folds["1shot"]["mean"] == metrics["1shot"]["miou"] and folds["1shot"]["paper_mean"] == published
    assert not folds["complete"] and "Mean of folds [0] only" in (proj / "results/folds.md").read_text()
    # docs/paper.md's narrow `dvc exp show`: the preset's score, the paper's and what the preset is, nothing else
    table = sh("COLUMNS=200 " + doc_block("compare-presets")[0]).splitlines()
    assert table[1].split() == ["Experiment", "1shot.miou", "paper.1shot.paper", "paper.1shot.difference",
                                "data.benchmark", "model.head", "model.backbone", "model.finetune"], table
    row = table[3].split()
    assert [float(x) for x in row[1:4]] == [metrics["1shot"]["miou"], published,
                                            metrics["paper"]["1shot"]["difference"]], table
    assert row[0] == "workspace" and row[4:] == [bench, "baseline", cfg.model.backbone, "frozen"], table

    # the data exists once on disk: a prepared image is its raw file, and DVC's cache holds no copy of it
    import hashlib
    image = sorted((proj / "data/prepared" / bench / "images").iterdir())[0]
    digest = hashlib.md5(image.read_bytes()).hexdigest()
    assert image.stat().st_nlink == 2 and not (proj / ".dvc/cache/files/md5" / digest[:2] / digest[2:]).exists()
    # an edit of the models, the schema or the stages' shared code reruns no download
    for f in ("pipeline/models/layers.py", "pipeline/config.py", "pipeline/svf.py", "stages/common.py"):
        (proj / f).write_text((proj / f).read_text() + "\n# an edit\n")
    out = sh("dvc repro download weights")
    assert "Stage 'download' didn't change" in out and "Running stage 'weights'" in out, out
    # the weights file replaced under the same name: the stages that read it see it (validate hashes it)
    weights = proj / cfg.model.pretrained
    state = torch.load(weights, weights_only=True)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, weights)
    sh("dvc repro validate")
    status = sh("dvc status train@0-1")
    assert "data/inputs.json" in status and "modified" in status, status


def test_validate_checks_the_weights_file_and_the_mlflow_store(tmp_path):
    """Before DVC removes anything: a missing weights file is named with the architecture the preset needs, a file
    of another architecture is refused, an MLflow server that does not answer is named."""
    import socket

    from pipeline.models.backbone import Backbone, to_checkpoint_state
    from stages.preset import render
    from stages.validate import check_tracking, check_weights
    cfg = load_config(yaml.safe_load(render("pascal_baseline_frozen_vgg").split("\n", 2)[2]))
    cfg.model.pretrained = str(tmp_path / "vgg16_bn.pth")
    assert "path of a VGG-16-BN (torchvision's layout) checkpoint" in check_weights(cfg)[0]
    torch.save(to_checkpoint_state(Backbone("resnet18")), tmp_path / "vgg16_bn.pth")
    assert check_weights(cfg)                               # a ResNet's keys where VGG-16's belong
    torch.save(to_checkpoint_state(Backbone("vgg16_bn")), tmp_path / "vgg16_bn.pth")
    assert check_weights(cfg) == []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg.tracking.uri = f"http://127.0.0.1:{port}"
    assert "does not answer" in check_tracking(cfg)[0]
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert check_tracking(cfg) == []


def test_the_summary_averages_the_folds_beside_the_papers_mean():
    from stages.preset import render
    from stages.summary import summarise, table
    cfg = load_config(yaml.safe_load(render("pascal_pfenet_frozen").split("\n", 2)[2]))
    metrics = {f: {"1shot": {"miou": 60.0 + f}, "5shot": {"miou": 70.0 + f}, "parity": 6.0} for f in range(4)}
    s = summarise(cfg, metrics)
    assert s["complete"] and s["1shot"]["mean"] == 61.5 and s["5shot"]["mean"] == 71.5
    assert s["1shot"]["paper_mean"] == round(sum([66.61, 72.55, 65.33, 60.91]) / 4, 2)
    assert s["1shot"]["difference"] == round(61.5 - s["1shot"]["paper_mean"], 2)
    text = table(s, "Table 1")
    assert "| 1shot | 60.00 | 61.00 | 62.00 | 63.00 | 61.50 |" in text and "Mean of folds" not in text
