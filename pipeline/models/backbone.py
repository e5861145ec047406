"""Backbones exposed as layer0..layer4, with BatchNorm pinned to eval mode.

Four families:
  * torchvision's ResNet-18/34/50/101 (7x7 stem), loaded from torchvision checkpoints;
  * ``resnet10_slim``: torchvision's layout (7x7 stem, BasicBlocks) with one block per stage at half
    width (32-64-128-256 channels), for the embedded synthetic benchmark (the default reaches 74 mIoU
    with it, README) at a ninth of ResNet-18's time (fwd+bwd, batch 16, 96 px, OS 8, 2-core CPU: 0.09 s
    vs 0.81 s).
    It has no ImageNet weights; ``model.pretrained: synthetic`` pretrains it offline;
  * the deep-stem ResNet-50/101 of PSPNet (``resnet50_deep``, ``resnet101_deep``): a stem of three
    3x3 convs 3->64 (stride 2), 64->64, 64->128, each with BN + ReLU, then max-pool; layer1 takes 128
    channels. These are the ImageNet weights PFENet, BAM and the SVF authors load
    (``resnet50_v2.pth`` / ``resnet101_v2.pth``); ``load_deep_state`` maps that file's keys strictly.
  * ``vgg16_bn`` as the SVF authors (and PFENet, BAM) cut torchvision's ``vgg16_bn.features``: layer0..4 =
    features[0:7], [7:14], [14:24], [24:34], [34:43] (pool5 dropped), every max-pool with ``ceil_mode``
    (their make_layers: 473 px gives 237, 119, 60, 30, 30; torchvision's floor mode 236, 118, 59, 29), no
    dilation: layer2 at stride 8, layer3 and layer4 at 16, whatever ``output_stride`` and ``dilation`` say.
    Its convs carry biases (SVF keeps them frozen). Weights: torchvision's ImageNet checkpoint
    (vgg16_bn-6c64b313.pth), given as a path (``model.pretrained``).
Output stride 8 comes in two dilation styles (``model.dilation``): ``pspnet`` (PSPNet/BAM: every 3x3
conv of layer3 dilation 2, of layer4 dilation 4, every stride 1) and ``torchvision``
(``replace_stride_with_dilation``: the first block of layer3 keeps dilation 1, that of layer4 2),
which is what the SVF authors' PFENet builds (model/module/resnet.py, no PSPNet override in
model/pfenet.py).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

log = logging.getLogger(__name__)

ARCHS = ("resnet10_slim", "resnet18", "resnet34", "resnet50", "resnet101", "resnet50_deep", "resnet101_deep",
         "vgg16_bn")
DEEP = {"resnet50_deep": "resnet50", "resnet101_deep": "resnet101"}
DILATIONS = ("pspnet", "torchvision")
# (layer2, layer3, layer4) output channels
CHANNELS = {"resnet10_slim": (64, 128, 256), "resnet18": (128, 256, 512), "resnet34": (128, 256, 512),
            "resnet50": (512, 1024, 2048), "resnet101": (512, 1024, 2048),
            "resnet50_deep": (512, 1024, 2048), "resnet101_deep": (512, 1024, 2048), "vgg16_bn": (256, 512, 512)}
# vgg16_bn.features[a:b] for layer0..layer4 (the SVF authors' get_vgg16_layer; index 43, pool5, unused)
VGG_CUTS = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 43))
# the ImageNet files no stage downloads (no full sha256 established here): where they come from
BY_PATH = {"resnet50_deep": "resnet50_v2.pth, PSPNet's deep stem, linked from PFENet's README",
           "resnet101_deep": "resnet101_v2.pth, PSPNet's deep stem, linked from PFENet's README",
           "vgg16_bn": "torchvision's https://download.pytorch.org/models/vgg16_bn-6c64b313.pth"}
# the deep stem's modules in layer0 = Sequential(conv1, bn1, relu, conv2, bn2, relu, conv3, bn3, relu, maxpool)
DEEP_STEM = {"conv1": 0, "bn1": 1, "conv2": 3, "bn2": 4, "conv3": 6, "bn3": 7}


def _deep_stem() -> nn.Sequential:
    def cbr(cin, cout, stride=1):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*cbr(3, 64, 2), *cbr(64, 64), *cbr(64, 128), nn.MaxPool2d(3, 2, 1))


def _deep_layer1(net: nn.Module) -> nn.Sequential:
    """layer1 on the deep stem's 128 channels (torchvision's takes 64)."""
    from torchvision.models.resnet import Bottleneck, conv1x1
    blocks = len(net.layer1)
    down = nn.Sequential(conv1x1(128, 256), nn.BatchNorm2d(256))
    return nn.Sequential(Bottleneck(128, 64, downsample=down), *[Bottleneck(256, 64) for _ in range(1, blocks)])


def _slim_resnet() -> nn.Module:
    """ResNet-10 at half width in torchvision's module layout (conv1/bn1/relu/maxpool, layer1..4)."""
    from torchvision.models.resnet import BasicBlock, conv1x1
    net = nn.Module()
    net.conv1, net.bn1 = nn.Conv2d(3, 32, 7, 2, 3, bias=False), nn.BatchNorm2d(32)
    net.relu, net.maxpool = nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
    cin = 32
    for i, width in enumerate((32, 64, 128, 256)):
        stride = 1 if i == 0 else 2
        down = None if stride == 1 and cin == width else nn.Sequential(conv1x1(cin, width, stride),
                                                                       nn.BatchNorm2d(width))
        setattr(net, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, width, stride, down)))
        cin = width
    return net


def _vgg16_bn_layers() -> list[nn.Sequential]:
    """layer0..layer4 of vgg16_bn, max-pools in ceil mode as the authors' make_layers builds them."""
    feats = torchvision.models.vgg16_bn(weights=None).features
    for m in feats:
        if isinstance(m, nn.MaxPool2d):
            m.ceil_mode = True
    return [nn.Sequential(*feats[a:b]) for a, b in VGG_CUTS]


WEIGHT_ENUMS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights",
                "resnet50": "ResNet50_Weights", "resnet101": "ResNet101_Weights"}


def _dilate(layer: nn.Module, dilation: int) -> None:
    """Output stride 8, PSPNet/PFENet style: every 3x3 conv of the stage gets the dilation, strides 1."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation, m.padding = (dilation, dilation), (dilation, dilation)


class Backbone(nn.Module):
    """layer0 (stem incl. max-pool) .. layer4 of a torchvision ResNet.

    ``train()`` never takes BatchNorm out of eval mode: the running statistics from pre-training
    are kept in every fine-tune regime, as the SVF authors require.
    """

    def __init__(self, arch: str = "resnet50", output_stride: int = 8, dilation: str = "pspnet"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown backbone {arch!r}; choose one of {ARCHS}")
        if dilation not in DILATIONS:
            raise ValueError(f"unknown dilation style {dilation!r}; choose one of {DILATIONS}")
        if output_stride not in (8, 32):
            raise ValueError(f"output_stride must be 8 or 32, got {output_stride}")
        self.arch, self.deep, self.channels = arch, arch in DEEP, CHANNELS[arch]
        if arch == "vgg16_bn":
            self.layer0, self.layer1, self.layer2, self.layer3, self.layer4 = _vgg16_bn_layers()
            return
        base = DEEP.get(arch, arch)
        tv_dilate = output_stride == 8 and dilation == "torchvision"
        if tv_dilate and base in ("resnet10_slim", "resnet18", "resnet34"):
            raise ValueError(f"{arch} has BasicBlocks, which torchvision cannot dilate; use model.dilation: pspnet")
        net = _slim_resnet() if base == "resnet10_slim" else getattr(torchvision.models, base)(
            weights=None, **({"replace_stride_with_dilation": [False, True, True]} if tv_dilate else {}))
        if self.deep:
            self.layer0, self.layer1 = _deep_stem(), _deep_layer1(net)
        else:
            self.layer0, self.layer1 = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), net.layer1
        self.layer2, self.layer3, self.layer4 = net.layer2, net.layer3, net.layer4
        if output_stride == 8 and dilation == "pspnet":
            _dilate(self.layer3, 2)
            _dilate(self.layer4, 4)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def load_state(self, state: dict, source: str = "checkpoint") -> None:
        """Load an ImageNet checkpoint of this architecture's family, every key used."""
        if self.arch == "vgg16_bn":
            self.load_vgg_state(state, source)
        elif self.deep:
            self.load_deep_state(state, source)
        else:
            self.load_torchvision_state(state, source)

    def load_deep_state(self, state: dict, source: str = "checkpoint") -> None:
        """Load the PSPNet deep-stem layout (``resnet50_v2.pth``): conv1..3/bn1..3 at the top, layer1..4,
        fc (unused). Strict: a missing or unexpected key is an error naming them (``num_batches_tracked``,
        absent from files of older PyTorch, excepted)."""
        if any(k.startswith("features.") for k in state):
            raise ValueError(f"{source} is a VGG checkpoint; use model.backbone: vgg16_bn")
        if "conv1.weight" in state and tuple(state["conv1.weight"].shape[-2:]) == (7, 7):
            raise ValueError(f"{source} is a torchvision ResNet checkpoint (7x7 stem); {self.arch} needs the "
                             "deep-stem PSPNet weights (resnet50_v2.pth / resnet101_v2.pth, see docs/paper.md), or "
                             f"model.backbone: {DEEP[self.arch]} for torchvision weights")
        mapped = {}
        for k, v in state.items():
            top, _, rest = k.partition(".")
            if top == "fc":
                continue
            mapped[f"layer0.{DEEP_STEM[top]}.{rest}" if top in DEEP_STEM else k] = v
        self._load_strict(mapped, source)

    def load_vgg_state(self, state: dict, source: str = "checkpoint") -> None:
        """Load torchvision's vgg16_bn layout (features.N, classifier unused) into layer0..layer4."""
        if not any(k.startswith("features.") for k in state):
            raise ValueError(f"{source} is not a VGG checkpoint (no features.N keys; it looks like "
                             f"{_family(state)}); vgg16_bn needs {BY_PATH['vgg16_bn']}")
        where = {i: (k, i - a) for k, (a, b) in enumerate(VGG_CUTS) for i in range(a, b)}
        mapped = {}
        for key, v in state.items():
            top, idx, rest = key.split(".", 2) if key.count(".") >= 2 else (key, "", "")
            if top == "classifier":
                continue
            if top == "features" and idx.isdigit() and int(idx) in where:
                layer, j = where[int(idx)]
                key = f"layer{layer}.{j}.{rest}"
            mapped[key] = v
        self._load_strict(mapped, source)

    def _load_strict(self, mapped: dict, source: str) -> None:
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"{source} does not fit {self.arch}: {len(missing)} missing keys {missing[:8]}, "
                             f"{len(unexpected)} unexpected keys {unexpected[:8]}")

    def load_torchvision_state(self, state: dict, source: str = "checkpoint") -> None:
        """Load a torchvision ResNet state_dict (conv1/bn1/layerN/fc keys)."""
        if any(k.startswith("features.") for k in state):
            raise ValueError(f"{source} is a VGG checkpoint; use model.backbone: vgg16_bn")
        if "conv2.weight" in state and "conv3.weight" in state:
            raise ValueError(f"{source} is a deep-stem (PSPNet) checkpoint; use model.backbone: {self.arch}_deep")
        mapped = {}
        for k, v in state.items():
            if k.startswith("fc."):
                continue
            if k.startswith("conv1."):
                k = "layer0.0." + k[len("conv1."):]
            elif k.startswith("bn1."):
                k = "layer0.1." + k[len("bn1."):]
            mapped[k] = v
        self._load_strict(mapped, source)


def _family(state: dict) -> str:
    if "conv2.weight" in state and "conv3.weight" in state:
        return "a deep-stem ResNet (model.backbone: resnet50_deep)"
    if "conv1.weight" in state:
        return "a torchvision ResNet"
    return "no backbone this project knows"


def weights_path(root: str | Path, arch: str, source: str = "imagenet") -> Path:
    """data/weights/<source>/<arch>.pth: ``imagenet`` written by the download stage, ``synthetic`` by pretrain."""
    return Path(root) / "weights" / source / f"{arch}.pth"


def load_backbone(arch: str, pretrained: str, output_stride: int = 8, seed: int = 0,
                  weights_root: str | Path = "data", dilation: str = "pspnet") -> Backbone:
    """Build the backbone and load its weights.

    ``pretrained``: ``imagenet`` (the file the download stage wrote, else torchvision's weight enum,
    fetched by torch.hub where the network allows; the deep-stem weights have no stable URL: give
    their path), ``synthetic`` (pretrained offline by the pretrain stage on a generated set disjoint
    from the benchmark, pipeline/pretrain.py), ``random`` (seeded; for offline runs and tests), or the
    path of a checkpoint of the architecture's family (torchvision, or PSPNet's deep stem).
    """
    torch.manual_seed(seed)
    bb = Backbone(arch, output_stride, dilation)
    if pretrained == "none":   # the caller loads a full state_dict next (merged models)
        return bb
    if pretrained == "random":
        log.warning("backbone %s is randomly initialised (seed %d): fine for offline runs and tests, "
                    "not for results comparable with the literature", arch, seed)
        return bb
    if pretrained == "synthetic":
        local = weights_path(weights_root, arch, "synthetic")
        if not local.exists():
            raise FileNotFoundError(f"pretrained synthetic backbone {local} is missing; run the pretrain stage "
                                    "(`dvc repro pretrain`)")
        state = torch.load(local, map_location="cpu", weights_only=True)
    elif pretrained == "imagenet":
        local = weights_path(weights_root, arch)
        if local.exists():
            state = torch.load(local, map_location="cpu", weights_only=True)
        elif arch not in WEIGHT_ENUMS and arch not in BY_PATH:
            raise FileNotFoundError(f"{arch} has no ImageNet weights; use model.pretrained: synthetic (offline "
                                    "pretraining) or a checkpoint path")
        elif arch in BY_PATH:
            raise FileNotFoundError(f"the ImageNet weights of {arch} ({BY_PATH[arch]}) are not downloaded by the "
                                    "pipeline (no full sha256 could be established for them): fetch the file and set "
                                    "model.pretrained to its path (see docs/paper.md, 'The backbone weights')")
        else:
            raise FileNotFoundError(f"the ImageNet weights of {arch} are not at {local}: run `dvc repro weights` "
                                    "(or `python -m stages.weights` with model.pretrained: imagenet), which fetches "
                                    "torchvision's checkpoint and verifies its full sha256")
    else:
        path = Path(pretrained)
        if not path.exists():
            family = "VGG-16-BN (torchvision's layout)" if arch == "vgg16_bn" else \
                "deep-stem ResNet (PSPNet's resnet50_v2.pth layout)" if arch.endswith("_deep") else f"{arch} (torchvision's)"
            raise FileNotFoundError(f"model.pretrained: checkpoint {path} does not exist; give 'imagenet', "
                                    f"'synthetic', 'random' or the path of a {family} checkpoint")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"model.pretrained: {path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from e
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        pretrained = str(path)
    bb.load_state(state, f"checkpoint {pretrained}" if pretrained not in ("imagenet", "synthetic") else
                  f"{pretrained} weights of {arch}")
    return bb


def to_checkpoint_state(bb: Backbone) -> dict:
    """The backbone's weights in its family's checkpoint layout (the inverse of ``Backbone.load_state``)."""
    if bb.arch == "vgg16_bn":
        out = {}
        for k, v in bb.state_dict().items():
            layer, j, rest = k.split(".", 2)
            out[f"features.{VGG_CUTS[int(layer[-1])][0] + int(j)}.{rest}"] = v
        return out
    inverse = {v: k for k, v in DEEP_STEM.items()} if bb.deep else {0: "conv1", 1: "bn1"}
    out = {}
    for k, v in bb.state_dict().items():
        if k.startswith("layer0."):
            _, idx, rest = k.split(".", 2)
            k = f"{inverse[int(idx)]}.{rest}"
        out[k] = v
    return out


def state_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's state_dict: ties an adapter to the exact base weights it was trained on."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
