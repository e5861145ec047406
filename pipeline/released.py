"""The trained models the PFENet and BAM authors publish, read into this project's models.

A released file is what the authors' train.py saves: ``{'epoch', 'state_dict', 'optimizer'}`` (or a bare
state_dict), its keys prefixed ``module.`` when the model was wrapped (PFENet always, BAM on several GPUs).
The file carries no configuration, and the settings its keys cannot show come from the code that trained
it (``FORMATS``): both repositories build their ResNets with PSPNet-style dilation (the torchvision style
gives the same keys and moves outputs by 3-18%), PFENet's pyramid bins come from its config by benchmark.
The key map (``ours``) is a handful of renames:

  PFENet  layer0-4 -> backbone.layer0-4; beta_conv.i.{0,2} -> beta_conv.i.{0,1}.0; res2.{0,2} -> res2.{0,1}.0
  BAM     layer0-4 -> backbone.layer0-4 and base.backbone.layer0-4 (one backbone serves both learners);
          learner_base.0.features.i.(j+1) -> base.ppm.features.i.j; learner_base.1 -> base.cls;
          ASPP_meta.layer6_0 -> aspp.image_pool, ASPP_meta.layer6_(i+1) -> aspp.branches.i, res1_meta -> res1,
          res2_meta.{0,2} -> res2.{0,1}.0

Strict: every key of the file lands on one of the model's, or the keys left over and missing are named; a
shape that differs names what the file is (backbone, benchmark, shots, read from its own shapes) and the
preset that fits it. A released model is kept whole, its backbone included (PFENet's BatchNorm statistics
moved in training), as a merged model (pipeline/adapter.py).
"""
from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path

# the settings each repository's code fixes, over the preset's (a file cannot show them)
FORMATS = {
    "pfenet": {"heads": ("pfenet",), "dilation": {"pfenet": "pspnet"},                   # PFENet model/resnet.py
               "bins": {"pascal": [60, 30, 15, 8], "coco": [1.0, 0.5, 0.25, 0.125]}},   # PFENet config/*/*.yaml
    "bam": {"heads": ("bam",), "dilation": {"bam": "pspnet"}},                           # BAM model/PSPNet.py
    # the SVF authors' code: aspp.py and pfenet.py on torchvision's dilation, BAM.py on its PSPNet's;
    # pfenet.py's ppm_scales fixed at [60, 30, 15, 8]; each conv of layer0-4 in factors, rank rounded to 4
    "svf": {"heads": ("baseline", "pfenet", "bam"), "dilation": {"baseline": "torchvision", "pfenet": "torchvision",
                                                               "bam": "pspnet"},
            "bins": {"pascal": [60, 30, 15, 8], "coco": [60, 30, 15, 8]}},
}

# this project's meta-learner names in the reference's (the baseline's and BAM's ASPP, BAM's residual blocks)
ASPP_NAMES = {"aspp.image_pool.0": "ASPP_meta.layer6_0.0", "res1.": "res1_meta.", "res2.0.0": "res2_meta.0",
              "res2.1.0": "res2_meta.2", **{f"aspp.branches.{i}.0": f"ASPP_meta.layer6_{i + 1}.0" for i in range(4)}}
_THEIRS = sorted(((b, a) for a, b in ASPP_NAMES.items()), key=lambda p: -len(p[0]))


def read(path: str | Path) -> tuple[dict, str]:
    """(the file's state_dict without DataParallel's ``module.`` prefix, the file's sha256)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"released checkpoint {path} does not exist")
    import torch
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:          # read with weights_only: a file that needs arbitrary code is not run
        raise ValueError(f"{path} is not a PyTorch checkpoint of tensors, numbers and dicts (as the authors' train.py "
                         f"saves one); torch.load with weights_only refused it ({type(e).__name__})") from e
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} holds no state_dict (a dict with 'state_dict', or a dict of tensors)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}, digest


def fold_factors(state: dict) -> dict:
    """The SVF authors' factorised convs (``X.conv_V.weight`` [r, in, kh, kw], ``X.vector_S`` [1, r, 1, 1],
    ``X.conv_U.weight`` [out, r, 1, 1], ``X.conv_U.bias``) folded into dense ``X.weight`` = U diag(S) V^T (in
    float64, as pipeline/svf.py merges) and ``X.bias``; every other key as it is."""
    import torch
    out = {k: v for k, v in state.items() if not k.endswith((".vector_S", ".conv_U.weight", ".conv_V.weight",
                                                             ".conv_U.bias"))}
    for key in [k[:-len(".vector_S")] for k in state if k.endswith(".vector_S")]:
        v, s, u = (state[f"{key}.{n}"] for n in ("conv_V.weight", "vector_S", "conv_U.weight"))
        r = v.shape[0]
        w = u.double().reshape(-1, r) @ (s.double().reshape(r, 1) * v.double().reshape(r, -1))
        out[f"{key}.weight"] = w.reshape(u.shape[0], *v.shape[1:]).to(v.dtype)
        if f"{key}.conv_U.bias" in state:
            out[f"{key}.bias"] = state[f"{key}.conv_U.bias"]
    return out


def ours(key: str, fmt: str, head: str) -> list[str]:
    """The names of this project's model that the reference's ``key`` fills (BAM's backbone: two, one in the SVF
    authors' BAM, whose base learner's copy is layer0p-4p)."""
    m = re.match(r"layer([0-4])(p?)\.(.*)", key)
    if m:
        rest = f"layer{m[1]}.{m[3]}"
        if m[2]:
            return [f"base.backbone.{rest}"]
        return [f"backbone.{rest}"] + ([f"base.backbone.{rest}"] if head == "bam" and fmt == "bam" else [])
    if head == "pfenet":
        key = re.sub(r"^(beta_conv\.\d+|res2)\.([02])\.", lambda g: f"{g[1]}.{int(g[2]) // 2}.0.", key)
        return [key]
    m = re.match(r"learner_base\.0\.features\.(\d+)\.(\d+)\.(.*)", key)
    if m:
        return [f"base.ppm.features.{m[1]}.{int(m[2]) - 1}.{m[3]}"]
    if key.startswith("learner_base.1."):
        return ["base.cls." + key[len("learner_base.1."):]]
    for theirs, mine in _THEIRS:
        if key.startswith(theirs):
            return [mine + key[len(theirs):]]
    return [key]


def base_learner_state(state: dict) -> dict:
    """BAM's released base learner (PSPNet ``best.pth``) in this project's names (pipeline/models/pspnet.py): its
    backbone is stored twice, ``layer*`` and ``encoder.<i>.*`` (the same tensors: checked, one kept), the pyramid's
    indices shift by one (their index 0 is the pooling)."""
    import torch
    out = {}
    for key, value in state.items():
        m = re.match(r"encoder\.([0-4])\.(.*)", key)
        if m:
            twin = state.get(f"layer{m[1]}.{m[2]}")
            if twin is None or not torch.equal(twin, value):
                raise ValueError(f"{key} is not the same tensor as layer{m[1]}.{m[2]}: not a BAM base learner")
            continue
        m = re.match(r"ppm\.features\.(\d+)\.(\d+)\.(.*)", key)
        out[f"ppm.features.{m[1]}.{int(m[2]) - 1}.{m[3]}" if m else
            f"backbone.{key}" if re.match(r"layer[0-4]\.", key) else key] = value
    return out


def describe(state: dict, fmt: str) -> dict:
    """What a file's own keys and shapes say it is: the code that wrote it, its backbone, and for BAM its benchmark (the base learner's classes)
    and shot count (the k-shot reweighting's inputs)."""
    out = {"backbone": "resnet50_deep" if any(k.startswith("layer1.0.conv1.") for k in state) else "vgg16_bn"}
    kinds = {"bam": "learner_base.", "pfenet": "beta_conv.", "baseline": "ASPP_meta."}   # keys only that head has
    out["head"] = next((h for h, k in kinds.items() if any(key.startswith(k) for key in state)), None)
    out["factorised"], out["asked"] = any(k.endswith(".vector_S") for k in state), fmt
    if fmt != "svf" and out["factorised"]:
        out["format"] = "svf"
    elif fmt == "svf" or out["head"] in FORMATS and out["head"] in FORMATS[fmt]["heads"]:
        out["format"] = fmt
    else:
        out["format"] = out["head"]
    if fmt == "bam" and "learner_base.1.4.weight" in state:
        classes = int(state["learner_base.1.4.weight"].shape[0])
        out["benchmark"] = {16: "pascal", 61: "coco"}.get(classes, f"{classes - 1} base classes")
        out["shots"] = int(state["kshot_rw.0.weight"].shape[1]) if "kshot_rw.0.weight" in state else 1
    return out


def settings(cfg, fmt: str) -> dict:
    """{model key: value} that the format's code fixes over ``cfg`` (see ``FORMATS``)."""
    fixed, head = FORMATS[fmt], cfg.model.head
    out = {"dilation": fixed["dilation"][head], "pretrained": "none",   # whole and dense (factors folded)
           # the SVF authors' BAM has two backbones (its base learner's, layer0p-4p, and the tuned one): not shared
           "finetune": "full" if fmt == "svf" and head == "bam" else "frozen"}
    if head == "pfenet":
        out["bins"] = fixed["bins"][cfg.data.benchmark]
    return out


def configure(cfg, fmt: str) -> None:
    """Set on ``cfg`` what the format's code fixes and the file cannot show."""
    for key, value in settings(cfg, fmt).items():
        setattr(cfg.model, key, value)


# ------------------------------------------------------------------ under `dvc repro` (train.released)
DEFAULT_FORMAT = {"pfenet": "pfenet", "bam": "bam", "baseline": "svf"}


def format_of(cfg) -> str:
    return cfg.train.released_format or DEFAULT_FORMAT[cfg.model.head]


def path_of(cfg, fold: int, shot: int) -> Path:
    """train.released with its ``{fold}`` and ``{shot}`` filled (one file per fold and shot count)."""
    return Path(cfg.train.released.format(fold=fold, shot=shot))


def check_params(cfg) -> list[str]:
    """What params.yaml must say for train.released to be adopted as written (each as ``key: value``, why):
    every stage rebuilds the model from params.yaml, so the settings the file cannot show are kept there."""
    fmt = format_of(cfg)
    if cfg.model.head not in FORMATS[fmt]["heads"]:
        return [f"train.released_format: {fmt} trains {' or '.join(FORMATS[fmt]['heads'])}, not model.head "
                f"{cfg.model.head}"]
    try:
        path_of(cfg, 0, 1)
    except (KeyError, IndexError, ValueError) as e:
        return [f"train.released: {cfg.train.released!r} may hold only the placeholders {{fold}} and {{shot}} ({e})"]
    return [f"model.{k}: {v!r} (now {getattr(cfg.model, k)!r}; {fmt}'s code fixes it)"
            for k, v in settings(cfg, fmt).items() if getattr(cfg.model, k) != v]


def released_params(cfg, file: str, fmt: str = "", template: bool = False) -> object:
    """A copy of ``cfg`` that adopts ``file`` (train.released; ``template``: its ``{fold}`` and ``{shot}`` are
    placeholders) in the format's settings."""
    from .config import ConfigError
    fmt_of = fmt or DEFAULT_FORMAT[cfg.model.head]
    if cfg.model.head not in FORMATS[fmt_of]["heads"]:
        raise ConfigError(f"format {fmt_of} trains {' or '.join(FORMATS[fmt_of]['heads'])}, not {cfg.model.head}: "
                          f"choose a {' or '.join(FORMATS[fmt_of]['heads'])} preset")
    cfg = copy.deepcopy(cfg)
    if fmt_of != "svf" and cfg.eval.paper:     # the authors' own models are the SVF paper's frozen rows
        cfg.eval.paper = cfg.eval.paper.replace("_svf", "_frozen")
    cfg.train.released = file if template else file.replace("{", "{{").replace("}", "}}")
    cfg.train.released_format = fmt
    configure(cfg, format_of(cfg))
    return cfg


def fitting_preset(found: dict, head: str, benchmark: str) -> str:
    bench = found.get("benchmark", benchmark)
    return f"{bench}_{head}_frozen{'_vgg' if found['backbone'] == 'vgg16_bn' else ''}"


def check_fits(found: dict, cfg, shots: int, preset: str) -> None:
    """Refuse a file whose backbone, benchmark or shots contradict the preset, naming the preset that fits."""
    m = cfg.model
    if found["head"] != m.head or found["format"] not in FORMATS:
        head = found["head"] or "unknown"
        raise ValueError(f"the file is a {head.upper()} checkpoint (its keys say so), not {m.head.upper()}: use --format "
                         f"{head if head in ('pfenet', 'bam') else 'svf'} with a {head} preset, e.g. "
                         f"{fitting_preset(found, head, cfg.data.benchmark)}")
    if found["format"] != found["asked"]:
        raise ValueError(f"the file holds the SVF authors' conv factors (*.vector_S): use --format svf"
                         if found["format"] == "svf" else f"the file is of the {found['format']} format: use --format "
                         f"{found['format']}")
    wrong = [f"{what} {found[what]} (the preset's: {have})" for what, have in
             (("backbone", m.backbone), ("benchmark", cfg.data.benchmark), ("shots", shots))
             if what in found and found[what] != have]
    if wrong:
        raise ValueError(f"the file is a {m.head.upper()} model of {', '.join(wrong)}: use --preset "
                         f"{fitting_preset(found, m.head, cfg.data.benchmark)}"
                         + (f" --shot {found['shots']}" if "shots" in found else ""))


def load_into(model, state: dict, fmt: str, head: str, preset: str) -> None:
    """Fill ``model`` (built dense, this project's names) from a released state_dict (the SVF authors' factors
    folded first), strictly."""
    mine, state = model.state_dict(), fold_factors(state)
    filled, left = {}, []
    for key, value in state.items():
        names = [n for n in ours(key, fmt, head) if n in mine]
        if not names:
            left.append(key)
        for n in names:
            if tuple(mine[n].shape) != tuple(value.shape):
                raise ValueError(f"{key}: the file's {list(value.shape)} against the model's {list(mine[n].shape)} "
                                 f"(preset {preset})")
            filled[n] = value
    missing = sorted(set(mine) - set(filled))
    if left or missing:
        raise ValueError(f"the file does not fit the {fmt} model of preset {preset}: {len(left)} key(s) of the file "
                         f"unused {left[:6]}, {len(missing)} of the model missing {missing[:6]}")
    model.load_state_dict(filled, strict=True)


def build(cfg, fmt: str, path: str | Path, fold: int, shot: int, preset: str):
    """(model in eval mode, source record) of a released file on ``cfg`` (already in the format's settings):
    read, checked against ``cfg`` (``preset`` names it in errors), loaded strictly. BAM's base learner comes
    from the file too."""
    from .data.benchmarks import fold_classes
    from .models import build_model
    state, digest = read(path)
    check_fits(describe(state, fmt), cfg, shot, preset)
    base = {"classes": len(fold_classes(cfg, fold)[1]) + 1} if cfg.model.head == "bam" else None
    model, _ = build_model(cfg, base=base, shots=shot)
    load_into(model, state, fmt, cfg.model.head, preset)
    return model.eval(), {"file": str(path), "sha256": digest, "format": fmt, "fold": fold, "shots": shot}


def adapter_of(cfg, fold: int, shot: int, base: dict | None = None) -> tuple[dict, dict]:
    """(adapter state, source) for the train stage under train.released: the file's model as an adapter that
    `adapter.load_model` rebuilds exactly from params.yaml. PFENet and the baseline keep their whole backbone
    (``full``: the released BatchNorm statistics are not the ImageNet ones), on the seeded backbone that
    model.pretrained ``none`` builds; BAM's rests on ``base``, the base learner the base stage adopted from the
    same file, and is refused when this file's learner is another."""
    from .adapter import adapter_state
    from .models import state_fingerprint
    fmt, path = format_of(cfg), path_of(cfg, fold, shot)
    model, source = build(cfg, fmt, path, fold, shot, "params.yaml")
    regime = "full"
    if cfg.model.head == "bam":
        model.backbone_fingerprint = state_fingerprint(model.base)
        if base is None or base["fingerprint"] != model.backbone_fingerprint:
            origin = (base or {}).get("released", {}).get("file", "a trained one")
            raise ValueError(f"{path}'s base learner is not the one in models/fold{fold}/base/base.pt (from {origin}); "
                             f"run `dvc repro base@{fold}` with this train.released")
        regime = cfg.model.finetune          # frozen: the base learner's backbone serves both learners
    return adapter_state(model, cfg, {"shots": shot, "released": source}, regime=regime), source


def base_learner_of(cfg, fold: int) -> tuple[object, dict]:
    """(BAM's base learner, source) from the fold's released meta-model file (train.released, the first of
    train.shots): the file holds the learner it was trained with (``layer*`` and ``learner_base.*``; the SVF
    authors' ``layer*p``)."""
    from .data.benchmarks import fold_classes
    from .models import base_learner
    fmt, shot = format_of(cfg), cfg.train.shots[0]
    path = path_of(cfg, fold, shot)
    state, digest = read(path)
    check_fits(describe(state, fmt), cfg, shot, "params.yaml")
    mine = {}
    for key, value in fold_factors(state).items():
        for name in ours(key, fmt, "bam"):
            if name.startswith("base."):
                mine[name[len("base."):]] = value
    net = base_learner(cfg.model, len(fold_classes(cfg, fold)[1]) + 1)
    want = net.state_dict()
    wrong = sorted(set(mine) ^ set(want)) or [k for k in want if tuple(want[k].shape) != tuple(mine[k].shape)]
    if wrong:
        raise ValueError(f"{path} holds no base learner of params.yaml's BAM (first difference {wrong[0]})")
    net.load_state_dict(mine, strict=True)
    return net.eval(), {"file": str(path), "sha256": digest, "format": fmt, "fold": fold}
