"""VGG-16 (vgg16_bn) as the SVF authors cut it: stages, ceil-mode pooling, checkpoints of either family, SVF
on a conv with a bias, and (given a checkout of zechao-li/SVF-few-shot-segmentation) layer parity with theirs."""
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

from conftest import rel_err
from pipeline.models.backbone import Backbone, load_backbone, to_checkpoint_state
from pipeline.svf import SVFConv2d, merge_svf, set_finetune

REFERENCE = os.environ.get("SVF_FSS_SVF_REPO", "")


def _stages(bb, x):
    out = []
    with torch.no_grad():
        for i in range(5):
            x = getattr(bb, f"layer{i}")(x)
            out.append(x)
    return out


def test_stages_channels_and_ceil_mode_pooling():
    bb = Backbone("vgg16_bn").eval()
    assert [len(getattr(bb, f"layer{i}")) for i in range(5)] == [7, 7, 10, 10, 9]     # pool5 dropped
    assert all(m.ceil_mode for m in bb.modules() if isinstance(m, nn.MaxPool2d))
    shapes = [tuple(f.shape[1:]) for f in _stages(bb, torch.randn(1, 3, 97, 97))]
    # ceil mode: 97 -> 49 -> 25 -> 13 -> 7 (torchvision's floor mode: 48, 24, 12, 6); layer4 keeps layer3's size
    assert shapes == [(64, 49, 49), (128, 25, 25), (256, 13, 13), (512, 7, 7), (512, 7, 7)]
    assert bb.channels == (256, 512, 512)


def test_checkpoints_of_either_family_and_missing_weights(tmp_path):
    tv = torchvision.models.vgg16_bn(weights=None)
    bb = Backbone("vgg16_bn")
    bb.load_state(tv.state_dict(), "torchvision vgg16_bn")           # classifier ignored, every features key used
    x = torch.randn(1, 3, 64, 64)          # a size where ceil and floor pooling agree
    tv.eval(), bb.eval()
    with torch.no_grad():
        assert torch.equal(_stages(bb, x)[-1], tv.features[:43](x))
    assert to_checkpoint_state(bb).keys() == {k for k in tv.state_dict() if k.startswith("features.")}
    with pytest.raises(ValueError, match="not a VGG checkpoint.*torchvision ResNet.*vgg16_bn-6c64b313"):
        bb.load_state(torchvision.models.resnet18(weights=None).state_dict(), "r18.pth")
    with pytest.raises(ValueError, match="is a VGG checkpoint; use model.backbone: vgg16_bn"):
        Backbone("resnet18").load_state(tv.state_dict(), "vgg.pth")
    with pytest.raises(ValueError, match="is a VGG checkpoint; use model.backbone: vgg16_bn"):
        Backbone("resnet50_deep").load_state(tv.state_dict(), "vgg.pth")
    with pytest.raises(FileNotFoundError, match=r"vgg16_bn-6c64b313\.pth.*model.pretrained to its path"):
        load_backbone("vgg16_bn", "imagenet", weights_root=tmp_path)
    path = tmp_path / "vgg16_bn.pth"
    torch.save(tv.state_dict(), path)
    assert torch.equal(load_backbone("vgg16_bn", str(path)).layer2[0].weight, tv.features[14].weight)


def test_svf_on_vgg_keeps_biases_frozen_and_merges_exactly():
    torch.manual_seed(0)
    bb = Backbone("vgg16_bn").eval()
    x = torch.randn(1, 3, 48, 48)
    ref = _stages(bb, x)[-1]
    counts = set_finetune(bb, "svf")
    assert counts["trainable"] == 3 * 256 + 3 * 512 + 3 * 512 == 3840      # the authors' count for VGG-16
    svf = [m for m in bb.modules() if isinstance(m, SVFConv2d)]
    assert len(svf) == 9 and all(m.bias is not None and not m.bias.requires_grad for m in svf)
    assert rel_err(_stages(bb, x)[-1], ref) < 1e-5
    merge_svf(bb)
    assert rel_err(_stages(bb, x)[-1], ref) < 1e-5


# ------------------------------------------------------------------ parity with the SVF authors' code
def reference_modules(repo: Path):
    """Import the authors' model/module/vgg.py and model/aspp.py (cv2 and the data utilities stubbed: the
    forward pass uses neither; their resnet.py imports a torchvision module that no longer exists)."""
    sys.path.insert(0, str(repo))
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    util = types.ModuleType("util.util")
    util.get_train_val_set = None
    sys.modules.setdefault("util", types.ModuleType("util"))
    sys.modules["util.util"] = util
    sys.modules.setdefault("torchvision.models.utils",
                           types.SimpleNamespace(load_state_dict_from_url=torch.hub.load_state_dict_from_url))
    import model.aspp as aspp
    import model.module.vgg as vgg
    return vgg, aspp


@pytest.mark.skipif(not REFERENCE, reason="set SVF_FSS_SVF_REPO to a checkout of github.com/zechao-li/"
                                          "SVF-few-shot-segmentation to compare the VGG-16 stages with the authors'")
def test_vgg_stages_equal_the_authors_cut():
    vgg, aspp = reference_modules(Path(REFERENCE))
    vgg.BatchNorm = nn.BatchNorm2d
    torch.manual_seed(0)
    theirs = vgg.vgg16_bn(pretrained=False)
    with torch.no_grad():            # non-trivial BN statistics, so the layers' boundaries show
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    layers = nn.ModuleList(aspp.get_vgg16_layer(theirs)).eval()
    ours = Backbone("vgg16_bn")
    ours.load_state(theirs.state_dict(), "the authors' vgg16_bn")
    ours.eval()
    for size in (97, 473):
        x = torch.randn(1, 3, size, size)
        want, f = [], x
        with torch.no_grad():
            for layer in layers:
                f = layer(f)
                want.append(f)
        errors = [rel_err(a, b) for a, b in zip(_stages(ours, x), want)]
        assert [a.shape for a in _stages(ours, x)] == [b.shape for b in want] and max(errors) < 1e-6, errors
        print(f"vgg16_bn stages vs the authors' cut at {size} px: worst relative error {max(errors):.2g}")
