"""Each preset carries the reference values of the setting it reproduces (a table taken from the authors' configs)."""
from pathlib import Path

import pytest

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


def test_every_preset_is_in_the_table():
    assert {p.stem for p in (ROOT / "presets").glob("*.yaml")} == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_has_the_reference_values(name):
    flat = load_config(ROOT / "presets" / f"{name}.yaml").flat()
    wrong = {k: (flat[k], v) for k, v in PRESETS[name].items() if flat[k] != v}
    assert not wrong, f"{name}: (preset, reference) {wrong}"
    text = (ROOT / "presets" / f"{name}.yaml").read_text()
    assert "zechao-li/SVF-few-shot-segmentation" in text and "BAM test.py" in text
    assert ("chunbolang/BAM" in text) == ("_bam_" in name)
