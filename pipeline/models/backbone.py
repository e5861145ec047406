"""ResNet backbones from torchvision, exposed as layer0..layer4, with BatchNorm pinned to eval mode."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

log = logging.getLogger(__name__)

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
# (layer2, layer3, layer4) output channels
CHANNELS = {"resnet18": (128, 256, 512), "resnet34": (128, 256, 512),
            "resnet50": (512, 1024, 2048), "resnet101": (512, 1024, 2048)}
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

    def __init__(self, arch: str = "resnet50", output_stride: int = 8):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown backbone {arch!r}; choose one of {ARCHS}")
        net = getattr(torchvision.models, arch)(weights=None)
        self.arch = arch
        self.layer0 = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if output_stride == 8:
            _dilate(self.layer3, 2)
            _dilate(self.layer4, 4)
        elif output_stride != 32:
            raise ValueError(f"output_stride must be 8 or 32, got {output_stride}")
        self.channels = CHANNELS[arch]

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def load_torchvision_state(self, state: dict) -> None:
        """Load a torchvision ResNet state_dict (conv1/bn1/layerN/fc keys)."""
        mapped = {}
        for k, v in state.items():
            if k.startswith("fc."):
                continue
            if k.startswith("conv1."):
                k = "layer0.0." + k[len("conv1."):]
            elif k.startswith("bn1."):
                k = "layer0.1." + k[len("bn1."):]
            mapped[k] = v
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit {self.arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def weights_path(root: str | Path, arch: str, source: str = "imagenet") -> Path:
    """data/weights/<source>/<arch>.pth: ``imagenet`` written by the download stage, ``synthetic`` by pretrain."""
    return Path(root) / "weights" / source / f"{arch}.pth"


def load_backbone(arch: str, pretrained: str, output_stride: int = 8, seed: int = 0,
                  weights_root: str | Path = "data") -> Backbone:
    """Build the backbone and load its weights.

    ``pretrained``: ``imagenet`` (the file the download stage wrote, else torchvision's weight enum,
    fetched by torch.hub where the network allows), ``synthetic`` (pretrained offline by the download
    stage on a generated set disjoint from the benchmark, pipeline/pretrain.py), ``random`` (seeded; for offline runs and tests), or
    a path to a torchvision checkpoint file.
    """
    torch.manual_seed(seed)
    bb = Backbone(arch, output_stride)
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
        else:
            enum = getattr(torchvision.models, WEIGHT_ENUMS[arch]).IMAGENET1K_V1
            try:
                state = enum.get_state_dict(progress=True)
            except Exception as e:  # no network
                raise RuntimeError(f"ImageNet weights for {arch} are not at {local} and could not be downloaded "
                                   f"({e}); run `dvc repro download` where the network allows, or set "
                                   f"model.pretrained to 'random' or a checkpoint path") from e
    else:
        path = Path(pretrained)
        if not path.exists():
            raise FileNotFoundError(f"model.pretrained: checkpoint {path} does not exist; give 'imagenet', "
                                    "'random' or the path of a torchvision ResNet checkpoint")
        state = torch.load(path, map_location="cpu", weights_only=True)
    bb.load_torchvision_state(state)
    return bb


def state_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's state_dict: ties an adapter to the exact base weights it was trained on."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
