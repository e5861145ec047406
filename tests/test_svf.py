import copy

import pytest
import torch
import torch.nn as nn
import torchvision

from conftest import rel_err
from pipeline.models import Backbone
from pipeline.svf import SVFConv2d, apply_svf, merge_svf, set_finetune, singular_values


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


def test_round_trip_every_resnet50_conv(resnet50):
    convs = [m for m in resnet50.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53
    g = torch.Generator().manual_seed(1)
    for conv in convs:
        svf = SVFConv2d.from_conv(conv)
        assert svf.rank == min(conv.out_channels, conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1])
        back = svf.to_conv()
        assert type(back) is nn.Conv2d
        assert rel_err(back.weight, conv.weight) < 1e-5
        x = torch.randn(1, conv.in_channels, 9, 9, generator=g)
        with torch.no_grad():
            ref = conv(x)
            for form in ("rebuild", "factorised"):
                svf.form = form
                assert rel_err(svf(x), ref) < 1e-5, (form, conv)


def test_svd_is_float64_and_stored_in_conv_dtype():
    conv = nn.Conv2d(8, 16, 3, padding=1).double()
    svf = SVFConv2d.from_conv(conv)
    assert svf.S.dtype == torch.float64 and svf.U.dtype == torch.float64
    assert rel_err(svf.to_conv().weight, conv.weight) < 1e-12
    # only S is a parameter; U, V and the bias are frozen buffers
    assert [n for n, _ in svf.named_parameters()] == ["S"]
    assert {"U", "Vh", "bias"} <= set(dict(svf.named_buffers()))


@pytest.mark.parametrize("groups", [2, 4, 8])
def test_grouped_and_depthwise_convs_are_exact(groups):
    torch.manual_seed(groups)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2, groups=groups, bias=True)
    svf = SVFConv2d.from_conv(conv)
    x = torch.randn(2, 8, 11, 13)
    with torch.no_grad():
        svf.S.mul_(1 + 0.3 * torch.randn_like(svf.S))
        for form in ("rebuild", "factorised"):
            svf.form = form
            assert rel_err(svf(x), svf.to_conv()(x)) < 1e-5
        svf.S.copy_(SVFConv2d.from_conv(conv).S)
        assert rel_err(svf(x), conv(x)) < 1e-5


def test_merge_after_perturbation_is_plain_and_equal():
    torch.manual_seed(0)
    bb = Backbone("resnet50").eval()
    apply_svf(bb)
    assert not any(isinstance(m, nn.Conv2d) for m in bb.modules())
    with torch.no_grad():
        for m in bb.modules():
            if isinstance(m, SVFConv2d):
                m.S.mul_(1 + 0.1 * torch.randn_like(m.S))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = bb.layer4(bb.layer3(bb.layer2(bb.layer1(bb.layer0(x)))))
    merged = merge_svf(copy.deepcopy(bb))
    assert not any(isinstance(m, SVFConv2d) for m in merged.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in merged.modules()) == 53
    with torch.no_grad():
        out = merged.layer4(merged.layer3(merged.layer2(merged.layer1(merged.layer0(x)))))
    assert rel_err(out, ref) < 1e-5


def test_svf_regime_grads_only_on_singular_values_of_layer2_to_4():
    torch.manual_seed(0)
    bb = Backbone("resnet18")
    counts = set_finetune(bb, "svf")
    bb.train()
    x = torch.randn(2, 3, 32, 32)
    bb.layer4(bb.layer3(bb.layer2(bb.layer1(bb.layer0(x))))).square().mean().backward()
    with_grad = {n for n, p in bb.named_parameters() if p.grad is not None}
    expected = {f"{k}" for k in singular_values(bb)}
    assert with_grad == expected
    assert all(n.split(".")[0] in ("layer2", "layer3", "layer4") and n.endswith(".S") for n in with_grad)
    assert counts["trainable"] == sum(v.numel() for v in singular_values(bb).values())
    assert all(not m.training for m in bb.modules() if isinstance(m, nn.BatchNorm2d))


def test_regime_counts_and_bn_eval():
    counts = {}
    for regime in ("frozen", "svf", "full"):
        bb = Backbone("resnet18")
        counts[regime] = set_finetune(bb, regime)["trainable"]
        bb.train()
        assert all(not m.training for m in bb.modules() if isinstance(m, nn.BatchNorm2d))
    assert counts["frozen"] == 0
    assert 0 < counts["svf"] < counts["full"]
    bb = Backbone("resnet18")   # full fine-tunes the stages svf does (model.svf_stages), every weight of them
    assert counts["full"] == sum(p.numel() for s in ("layer2", "layer3", "layer4") for p in getattr(bb, s).parameters())


def test_svf_stages_and_the_authors_rank_rule():
    from pipeline.config import ConfigError, load_config
    bb = Backbone("resnet10_slim")
    counts = set_finetune(bb, "svf", stages=("layer3",))
    assert {n.split(".")[0] for n, p in bb.named_parameters() if p.requires_grad} == {"layer3"}
    assert not any(isinstance(m, SVFConv2d) for m in bb.layer2.modules())
    assert counts["trainable"] == sum(m.rank for m in bb.layer3.modules() if isinstance(m, SVFConv2d))
    bb = Backbone("resnet10_slim")
    assert set_finetune(bb, "full", stages=("layer4",))["trainable"] == sum(p.numel() for p in bb.layer4.parameters())

    # the authors' svf.resolver: every conv of layer0..4 factorised, rank floored to a multiple of 4 (27 -> 24)
    conv = nn.Conv2d(3, 64, 3, padding=1, bias=True)
    m = SVFConv2d.from_conv(conv, rank="authors")
    U, S, Vh = torch.linalg.svd(conv.weight.detach().double().reshape(64, 27), full_matrices=False)
    assert m.rank == 24 and torch.allclose(m.dense_weight().double().reshape(64, 27),
                                           (U[:, :24] * S[:24]) @ Vh[:24], atol=1e-6)
    assert SVFConv2d.from_conv(nn.Conv2d(64, 64, 3), rank="authors").rank == 64
    bb = Backbone("resnet10_slim")
    counts = set_finetune(bb, "svf", rank="authors")
    assert all(not isinstance(x, nn.Conv2d) for x in bb.modules())          # layer0-1 factorised too ...
    trained = {n.split(".")[0] for n, p in bb.named_parameters() if p.requires_grad}
    assert trained == {"layer2", "layer3", "layer4"}                         # ... and frozen
    with pytest.raises(ValueError, match=r"model.svf_stages: \['layer5'\] names \['layer5'\]"):
        set_finetune(Backbone("resnet10_slim"), "svf", stages=("layer5",))
    with pytest.raises(ConfigError, match="model.svf_stages.*layer5.*layer0"):
        load_config({"model": {"svf_stages": ["layer2", "layer5"]}})
    with pytest.raises(ConfigError, match="model.svf_rank"):
        load_config({"model": {"svf_rank": "half"}})


def test_bad_arguments_list_what_is_accepted():
    with pytest.raises(TypeError, match="nn.Conv2d"):
        SVFConv2d.from_conv(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="frozen.*svf.*full"):
        set_finetune(Backbone("resnet18"), "lora")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        apply_svf("resnet")
    with pytest.raises(ValueError, match="padding_mode"):
        SVFConv2d.from_conv(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="rebuild"):
        SVFConv2d.from_conv(nn.Conv2d(3, 3, 3), form="lowrank")
