"""params.yaml -> typed, validated config objects. The one place that knows the parameter schema.

Unknown keys, wrong types and values outside a field's choices fail at start with the full key name.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from .data.benchmarks import BENCHMARKS


class ConfigError(ValueError):
    """A parameter is unknown, missing or invalid; the message names the key."""


def _choices(*values):
    return {"choices": values}


@dataclass
class SyntheticCfg:
    num_train: int = 1000
    num_val: int = 300
    image_size: int = 128
    seed: int = 0
    pretrain_iterations: int = 300    # backbone pretraining (model.pretrained: synthetic), pipeline/pretrain.py
    pretrain_size: int = 64
    pretrain_batch: int = 32


@dataclass
class FolderCfg:
    """Your own data (``data.benchmark: folder``): layout in pipeline/data/folder.py."""
    root: str = "examples/folder"
    val_fraction: float = 0.25        # images held out for novel-class episodes when the folder has no val.txt
    seed: int = 0


@dataclass
class DataCfg:
    benchmark: str = field(default="synthetic", metadata=_choices(*BENCHMARKS))
    root: str = "data"
    mirror: str = ""                  # base URL serving the archives under their file names (else official URLs)
    coco_split: str = field(default="interleaved", metadata=_choices("interleaved", "consecutive"))
    synthetic: SyntheticCfg = field(default_factory=SyntheticCfg)
    folder: FolderCfg = field(default_factory=FolderCfg)
    backbones: list = field(default_factory=lambda: ["resnet50"])  # ImageNet weights fetched by `weights`
    workers: Any = "auto"             # processes of download's generation and of prepare: auto = every core, or a count
    keep_archives: bool = True        # false: delete each archive once verified and extracted (docs/paper.md, disk)
    local: str = ""                   # a folder with the benchmark already on disk (archives or extracted trees), adopted


@dataclass
class SplitCfg:
    folds: list = field(default_factory=lambda: [0])
    min_pixels: int = 2048            # 2 x 32 x 32, the PFENet/BAM rule
    filter: str = field(default="bam", metadata=_choices("bam", "pfenet"))
    num_folds: int = 4                # folder benchmark: its classes cut into this many folds, like PASCAL-5i
    novel_classes: list = field(default_factory=list)   # folder benchmark: one fold, these novel classes (names or ids)
    reference_lists: str = ""         # a folder of the authors' data_list_<fold>.txt: each fold's images compared


@dataclass
class ModelCfg:
    head: str = field(default="pfenet", metadata=_choices("pfenet", "bam", "baseline"))   # bam needs the base stage
    backbone: str = field(default="resnet50", metadata=_choices("resnet10_slim", "resnet18", "resnet34", "resnet50",
                                                                "resnet101", "resnet50_deep", "resnet101_deep",
                                                                "vgg16_bn"))
    pretrained: str = "imagenet"      # imagenet | synthetic | random | path to a checkpoint of the backbone's family
    #                                   | none (train.released: the file fills the backbone)
    output_stride: int = field(default=8, metadata=_choices(8, 32))
    dilation: str = field(default="pspnet", metadata=_choices("pspnet", "torchvision"))  # pipeline/models/backbone.py
    finetune: str = field(default="svf", metadata=_choices("frozen", "svf", "full"))
    svf_form: str = field(default="rebuild", metadata=_choices("rebuild", "factorised"))
    svf_stages: list = field(default_factory=lambda: ["layer2", "layer3", "layer4"])   # svf and full train these
    svf_rank: str = field(default="full", metadata=_choices("full", "authors"))   # pipeline/svf.py RANKS
    reduce_dim: int = 256
    kshot_dim: int = 2                # BAM: kshot_trans_dim (k-shot reweighting, shot > 1)
    baseline_quirks: str = field(default="authors", metadata=_choices("authors", "fixed"))   # models/baseline.py
    bins: list = field(default_factory=lambda: [60, 30, 15, 8])  # ints: cells; floats <= 1: fraction of the feature size
    init_seed: int = 0                # seeds the head init and a random backbone


@dataclass
class TrainCfg:
    iterations: int = 1000            # used when epochs is 0
    epochs: int = 0                   # > 0: train this many epochs, validate after each (val_every ignored)
    patience: int = 0                 # > 0: stop after this many validations without a better val mIoU
    batch_size: int = 4
    shots: list = field(default_factory=lambda: [1])   # one model per shot count (the authors train each)
    sampling: str = field(default="pair", metadata=_choices("pair", "image"))   # pipeline/data/episodes.py
    lr: float = 0.0025                # the head's effective LR (no hidden x10)
    backbone_lr_scale: float = 0.1
    schedule: str = field(default="poly", metadata=_choices("poly", "constant"))
    optimizer: str = field(default="sgd", metadata=_choices("sgd", "adamw"))   # the papers: sgd
    momentum: float = 0.9             # sgd only
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    aux_weight: float = 1.0
    crop_size: int = 473
    scale: list = field(default_factory=lambda: [0.9, 1.1])
    rotate: float = 10.0
    hue_jitter: float = 0.0           # one random hue rotation in [-j, j] (turns) per episode, query and supports
    seed: int = 123
    device: str = "auto"
    amp: bool = True
    sync_bn: bool = False
    checkpoint_every: int = 200
    val_every: int = 200
    val_episodes: int = 200
    log_every: int = 20
    workers: int = 2
    devices: Any = 1                  # processes (GPUs) per node: a count or auto (every GPU; 1 on a CPU); the stage
    #                                   starts torchrun itself above 1. batch_size is the global batch, split between them
    nodes: int = 1                    # machines; above 1 every other node runs the command the stage prints
    master: str = "127.0.0.1:29500"   # host:port of the node that runs `dvc repro` (node rank 0), nodes > 1
    released: str = ""               # a published model adopted instead of training (docs/released.md); {fold}, {shot}
    released_format: str = field(default="", metadata=_choices("", "pfenet", "bam", "svf"))   # "": the head's own


@dataclass
class BaseCfg:
    """BAM's base learner (PSPNet over the fold's base classes), trained by the `base` stage
    (pipeline/base.py) with BatchNorm in train mode. Field names follow ``train``'s."""
    iterations: int = 1000            # used when epochs is 0
    epochs: int = 0                   # > 0: that many epochs over the training images, validation after each
    patience: int = 0
    batch_size: int = 12              # BAM: 3 x 4 GPUs
    lr: float = 0.0025                # PPM + classifier (BAM: 2.5e-4 x 10)
    backbone_lr_scale: float = 0.1    # BAM PASCAL: the backbone at 2.5e-4 (index_split 0); COCO: 1.0
    schedule: str = field(default="poly", metadata=_choices("poly", "constant"))
    optimizer: str = field(default="sgd", metadata=_choices("sgd", "adamw"))   # the papers: sgd
    momentum: float = 0.9             # sgd only
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    crop_size: int = 417
    scale: list = field(default_factory=lambda: [0.5, 2.0])
    rotate: float = 10.0
    seed: int = 321
    amp: bool = True
    sync_bn: bool = True              # SyncBatchNorm under torchrun (CUDA)
    checkpoint_every: int = 200
    val_every: int = 200
    val_images: int = 0               # 0: every validation image
    log_every: int = 20
    workers: int = 2
    devices: Any = 1                  # processes (GPUs) per node: a count or auto (every GPU; 1 on a CPU); the stage
    #                                   starts torchrun itself above 1. batch_size is the global batch, split between them
    nodes: int = 1                    # machines; above 1 every other node runs the command the stage prints
    master: str = "127.0.0.1:29500"   # host:port of the node that runs `dvc repro` (node rank 0), nodes > 1


@dataclass
class EvalCfg:
    protocol: str = field(default="random", metadata=_choices("random", "bam"))   # pipeline/data/episodes.py
    shots: list = field(default_factory=lambda: [1, 5])
    episodes: int = 1000
    seeds: list = field(default_factory=lambda: [510, 365, 382, 322, 988])
    test_size: int = 473
    device: str = "auto"
    figure_episodes: int = 4
    paper: str = ""                   # a setting of the SVF paper (pipeline/paper.py): report compares with it


@dataclass
class ExportCfg:
    opset: int = 18
    shots: list = field(default_factory=lambda: [1, 5])
    rtol: float = 1e-4
    parity_episodes: int = 4
    merge_tolerance: float = 1e-4
    fp16: bool = True
    max_batch: int = 8
    aoti: bool = False              # the AOTInductor package for C++ (export/aoti.py; minutes of g++): `make cpp` sets it
    exporter: str = field(default="auto", metadata=_choices("auto", "dynamo", "torchscript"))   # export/onnx_export.py
    int8: bool = False              # int8/query_decoder.onnx: static INT8 for the CPU, kept if its mIoU drop allows (export/int8.py)
    int8_max_drop: float = 1.0      # mIoU points INT8 may lose against FP32 on the evaluation episodes
    preview_size: int = 0           # > 0: preview/ split graphs at this smaller working size (interactive use), scored


@dataclass
class TrackingCfg:
    uri: str = ""                     # empty: sqlite:///<repo root>/mlflow.db
    experiment: str = "svf-fss"
    registered_model: str = "svf-fss-pfenet"


@dataclass
class Config:
    data: DataCfg = field(default_factory=DataCfg)
    split: SplitCfg = field(default_factory=SplitCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    base: BaseCfg = field(default_factory=BaseCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    export: ExportCfg = field(default_factory=ExportCfg)
    tracking: TrackingCfg = field(default_factory=TrackingCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for experiment trackers."""
        out = {}

        def walk(prefix, d):
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
                else:
                    out[f"{prefix}{k}"] = v
        walk("", self.to_dict())
        return out

    def fingerprint(self, *sections: str) -> str:
        d = self.to_dict()
        return json.dumps({s: d[s] for s in sections}, sort_keys=True)


def _coerce(value, typ, key):
    origin = get_origin(typ)
    if origin is Union:
        typ = [t for t in get_args(typ) if t is not type(None)][0]
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if typ is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'params'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(prefix + u for u in unknown)}; "
                          f"known under '{prefix.rstrip('.') or '<top>'}': {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        f, typ, key = fields[name], hints[name], prefix + name
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value or {}, key + ".")
            continue
        value = _coerce(value, typ, key)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        kwargs[name] = value
    return cls(**kwargs)


def _validate_loop(c, name: str) -> None:
    """The fields a training loop reads (``train`` and ``base`` share them)."""
    d = c.devices
    if d != "auto" and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
        raise ConfigError(f"{name}.devices: expected auto or a positive count of processes (GPUs) per node, got {d!r}")
    if c.nodes < 1:
        raise ConfigError(f"{name}.nodes: expected >= 1, got {c.nodes}")
    host, _, port = c.master.rpartition(":")
    if c.nodes > 1 and not (host and port.isdigit()):
        raise ConfigError(f"{name}.master: expected host:port of the node that runs `dvc repro`, got {c.master!r}")
    if isinstance(d, int) and c.batch_size % (d * c.nodes):
        raise ConfigError(f"{name}.batch_size {c.batch_size} is the global batch: make it a multiple of "
                          f"{name}.devices x {name}.nodes = {d * c.nodes}")
    if len(c.scale) != 2 or not 0 < c.scale[0] <= c.scale[1]:
        raise ConfigError(f"{name}.scale: expected [min, max] with 0 < min <= max, got {c.scale}")
    for key in ("iterations", "epochs", "patience", "batch_size"):
        if getattr(c, key) < 0:
            raise ConfigError(f"{name}.{key}: {getattr(c, key)} is negative")
    if c.batch_size < 1:
        raise ConfigError(f"{name}.batch_size must be >= 1")
    if c.epochs == 0 and c.iterations < 1:
        raise ConfigError(f"{name}.iterations must be >= 1 when {name}.epochs is 0")
    if c.epochs == 0 and c.val_every < 1:
        raise ConfigError(f"{name}.val_every must be >= 1 when {name}.epochs is 0 (with epochs, validation is per epoch)")
    if c.checkpoint_every < 1 or c.log_every < 1:
        raise ConfigError(f"{name}.checkpoint_every and {name}.log_every must be >= 1")


def _validate_folds(cfg: Config) -> None:
    s = cfg.split
    if cfg.data.benchmark != "folder":
        if s.num_folds != 4 or s.novel_classes:
            raise ConfigError(f"split.num_folds and split.novel_classes are for data.benchmark: folder; the folds of "
                              f"{cfg.data.benchmark} are fixed by its protocol (keep num_folds 4, novel_classes [])")
        folds = [0, 1, 2, 3]
    elif s.novel_classes:
        if any(isinstance(c, bool) or not isinstance(c, (int, str)) for c in s.novel_classes) or \
                len(set(s.novel_classes)) < len(s.novel_classes):
            raise ConfigError(f"split.novel_classes: expected distinct class names or ids, got {s.novel_classes!r}")
        folds = [0]
    else:
        if s.num_folds < 2:
            raise ConfigError(f"split.num_folds: expected at least 2, got {s.num_folds}")
        folds = list(range(s.num_folds))
    if not 0 < cfg.data.folder.val_fraction < 1:
        raise ConfigError(f"data.folder.val_fraction: expected between 0 and 1, got {cfg.data.folder.val_fraction}")
    for fold in s.folds:
        if fold not in folds:
            why = " (split.novel_classes makes a single fold)" if s.novel_classes else ""
            raise ConfigError(f"split.folds: fold {fold!r} does not exist; choose from {folds}{why}")


def _validate(cfg: Config) -> Config:
    _validate_folds(cfg)
    w = cfg.data.workers
    if w != "auto" and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
        raise ConfigError(f"data.workers: expected auto or a positive process count, got {w!r}")
    for key, ks in (("train.shots", cfg.train.shots), ("eval.shots", cfg.eval.shots),
                    ("export.shots", cfg.export.shots)):
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks) or len(set(ks)) < len(ks):
            raise ConfigError(f"{key}: expected distinct positive shot counts, got {ks!r}")
    if not cfg.model.bins:
        raise ConfigError("model.bins: at least one pyramid bin is needed")
    for b in cfg.model.bins:
        if not (isinstance(b, (int, float)) and b > 0):
            raise ConfigError(f"model.bins: {b!r} is neither a cell count (int > 1) nor a fraction (0 < f <= 1)")
    for name in ("train", "base"):
        _validate_loop(getattr(cfg, name), name)
    if cfg.data.mirror and not cfg.data.mirror.lower().startswith(("http://", "https://")):
        raise ConfigError(f"data.mirror: {cfg.data.mirror!r} is not an http:// or https:// URL")
    if not 0 <= cfg.train.hue_jitter <= 0.5:
        raise ConfigError(f"train.hue_jitter: expected 0 to 0.5 (a fraction of the hue circle), got {cfg.train.hue_jitter}")
    if cfg.train.val_episodes < 0 or cfg.base.val_images < 0:
        raise ConfigError("train.val_episodes and base.val_images must not be negative")
    if cfg.model.kshot_dim < 1:
        raise ConfigError(f"model.kshot_dim: expected >= 1, got {cfg.model.kshot_dim}")
    if cfg.eval.episodes < 1:
        raise ConfigError(f"eval.episodes must be >= 1, got {cfg.eval.episodes}")
    if cfg.eval.paper:
        from .paper import PUBLISHED
        if cfg.eval.paper not in PUBLISHED:
            raise ConfigError(f"eval.paper: {cfg.eval.paper!r} is not a setting of the SVF paper; known: "
                              f"{', '.join(sorted(PUBLISHED))}")
    stages = ("layer0", "layer1", "layer2", "layer3", "layer4")
    bad = [s for s in cfg.model.svf_stages if s not in stages]
    if bad or not cfg.model.svf_stages or len(set(cfg.model.svf_stages)) != len(cfg.model.svf_stages):
        raise ConfigError(f"model.svf_stages: {cfg.model.svf_stages!r} names {bad or 'no stage or one twice'}; "
                          f"{cfg.model.backbone} has the stages {list(stages)}")
    if cfg.model.dilation == "torchvision" and cfg.model.backbone in ("resnet10_slim", "resnet18", "resnet34"):
        raise ConfigError(f"model.dilation: torchvision cannot dilate {cfg.model.backbone}'s BasicBlocks; use pspnet")
    if cfg.train.device not in ("auto", "cpu", "cuda") and not cfg.train.device.startswith("cuda:"):
        raise ConfigError(f"train.device: {cfg.train.device!r}; choose auto, cpu, cuda or cuda:N")
    return cfg


def load_config(source: Union[str, Path, dict, None] = "params.yaml") -> Config:
    """Build the config from a params.yaml path or an already-parsed mapping."""
    if source is None:
        data = {}
    elif isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"parameter file {path} not found (run from the project root)")
        data = yaml.safe_load(path.read_text()) or {}
    return _validate(_build(Config, data, ""))


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config saved with ``Config.to_dict()`` (checkpoints carry it as JSON)."""
    return load_config(d)


def diff_configs(a: dict, b: dict, sections=("data", "split", "model", "base", "train")) -> list[str]:
    """Dotted keys whose values differ between two saved configs, restricted to ``sections``
    (a section, or a dotted key prefix such as ``model.backbone``)."""
    def keep(k):
        return any(k == s or k.startswith(s + ".") for s in sections)
    fa = {k: v for k, v in Config.flat(config_from_dict(a)).items() if keep(k)}
    fb = {k: v for k, v in Config.flat(config_from_dict(b)).items() if keep(k)}
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
