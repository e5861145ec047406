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

import hashlib
import re
from pathlib import Path

import torch

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


def configure(cfg, fmt: str) -> None:
    """Set on ``cfg`` what the format's code fixes and the file cannot show (see ``FORMATS``)."""
    fixed, m = FORMATS[fmt], cfg.model
    m.dilation = fixed["dilation"][m.head]
    if m.head == "pfenet":
        m.bins = fixed["bins"][cfg.data.benchmark]
    m.pretrained = "none"                # a released model is whole and dense (factors folded)
    # the SVF authors' BAM has two backbones (its base learner's, layer0p-4p, and the tuned one): not shared
    m.finetune = "full" if fmt == "svf" and m.head == "bam" else "frozen"


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
