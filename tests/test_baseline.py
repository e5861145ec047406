"""The SVF paper's baseline head (the authors' model/aspp.py): shapes, its two quirks behind
model.baseline_quirks, SVF, merge and export, and (given a checkout of zechao-li/SVF-few-shot-segmentation)
forward parity with theirs on ResNet-50 and VGG-16."""
import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import reference_name, rel_err
from pipeline.config import load_config
from pipeline.models import Baseline, build_model, fixed_shots, head_loss

REFERENCE = os.environ.get("SVF_FSS_SVF_REPO", "")


def base_cfg(regime="svf", quirks="authors", backbone="resnet10_slim", **model):
    return load_config({"model": {"head": "baseline", "backbone": backbone, "pretrained": "random", "reduce_dim": 16,
                                  "finetune": regime, "baseline_quirks": quirks, **model}})


def _inputs(b=2, k=1, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, size, size, generator=g), torch.randn(b, k, 3, size, size, generator=g),
            (torch.rand(b, k, size, size, generator=g) > 0.6).float())


def test_shapes_loss_and_what_trains():
    model, counts = build_model(base_cfg("svf"), shots=1)
    assert isinstance(model, Baseline) and counts["trainable"] > 0
    q, s, m = _inputs()
    model.train()
    out = model(q, s, m)
    assert out["logits"].shape == (2, 2, 48, 48)
    target = (torch.rand(2, 48, 48) > 0.5).long()
    loss, parts = head_loss(model, out, {"query_mask": target})
    assert set(parts) == {"main_loss"} and torch.equal(loss, parts["main_loss"])    # no auxiliary loss
    loss.backward()
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    # the authors' optimiser leaves down_query out: it keeps its initialisation
    assert "down_query" not in trained and {"down_supp", "init_merge", "aspp", "res1", "res2", "cls_meta"} <= trained
    assert all(n.endswith(".S") for n, p in model.backbone.named_parameters() if p.grad is not None)
    fixed, _ = build_model(base_cfg("svf", "fixed"), shots=1)
    assert all(p.requires_grad for p in fixed.down_query.parameters())
    model.eval()
    with torch.no_grad():
        assert model(q, s, m).shape == (2, 2, 48, 48)


def test_shots_are_summed_by_the_authors_and_averaged_when_fixed():
    q, s, m = _inputs(k=1, seed=2)
    two = (s.repeat(1, 2, 1, 1, 1), m.repeat(1, 2, 1, 1))
    authors, _ = build_model(base_cfg("frozen"), shots=2)
    authors1, _ = build_model(base_cfg("frozen"), shots=1)
    fixed, _ = build_model(base_cfg("frozen", "fixed"), shots=2)
    for other in (authors1, fixed):
        other.load_state_dict(authors.state_dict())
    for model in (authors, authors1, fixed):
        model.eval()
    with torch.no_grad():
        one = fixed(q, s, m)
        assert rel_err(authors1(q, s, m), one) < 1e-6          # one shot: summed and averaged agree
        assert rel_err(fixed(q, *two), one) < 1e-5             # averaged, two identical shots are one
        assert rel_err(authors(q, *two), one) > 1e-2           # summed, the prototype and the prior double
    assert fixed_shots(authors) == 2 and fixed_shots(fixed) is None
    with pytest.raises(ValueError, match="sums its shots and was trained with 2; got 1 supports"):
        authors(q, s, m)


def test_merge_and_onnx_export_of_a_two_shot_model(tmp_path):
    from export import onnx_export
    from pipeline import adapter as adapter_io
    from pipeline.svf import merge_svf
    cfg = base_cfg("svf")
    model, _ = build_model(cfg, shots=2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".S"):
                p.mul_(1 + 0.2 * torch.randn(p.shape))
    model.eval()
    merged = merge_svf(copy.deepcopy(model)).eval()
    adapter_io.save(adapter_io.merged_state(merged, cfg), tmp_path / "merged.pt")
    reloaded, _ = adapter_io.load_merged(tmp_path / "merged.pt")
    episodes = [_inputs(b=b, k=2, seed=b) for b in (1, 3)]
    with torch.no_grad():
        for q, s, m in episodes:
            assert rel_err(reloaded(q, s, m), model(q, s, m)) < 1e-5
    assert fixed_shots(reloaded) == 2
    path = onnx_export.export_onnx(reloaded, tmp_path / "model.onnx", 48)
    assert onnx_export.check_parity(reloaded, onnx_export.session(path, prefer_cuda=False), episodes, 1e-4)["max_rel"] < 1e-4
    enc, dec = onnx_export.export_split(reloaded, tmp_path, 48)
    assert onnx_export.check_parity(reloaded, onnx_export.SplitSession(enc, dec, prefer_cuda=False), episodes,
                                    1e-4)["max_rel"] < 1e-4


# ------------------------------------------------------------------ parity with the SVF authors' aspp.py
def _reference_state(ours: Baseline) -> dict:
    """Our state_dict in the names of the authors' OneModel (model/aspp.py)."""
    return {reference_name(k): v for k, v in ours.state_dict().items()}


@pytest.mark.skipif(not REFERENCE, reason="set SVF_FSS_SVF_REPO to a checkout of github.com/zechao-li/"
                                          "SVF-few-shot-segmentation to compare the baseline with the authors' aspp.py")
@pytest.mark.parametrize("backbone,shots", [("resnet50_deep", 1), ("resnet50_deep", 2), ("vgg16_bn", 2)])
def test_forward_parity_with_the_authors_aspp(tmp_path, backbone, shots):
    import types

    from test_vgg import reference_modules
    _, aspp = reference_modules(Path(REFERENCE))
    torch.manual_seed(0)
    ours, _ = build_model(base_cfg("frozen", backbone=backbone, reduce_dim=256, dilation="torchvision"), shots=shots)
    ours.eval()
    with torch.no_grad():
        for mod in ours.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    args = types.SimpleNamespace(layers=50, zoom_factor=8, shot=shots, vgg=backbone == "vgg16_bn", data_set="pascal",
                                 ignore_label=255, print_freq=10, low_fea="layer2", kshot_trans_dim=2, svf=False)
    cwd = os.getcwd()
    os.chdir(tmp_path)                     # their constructors load ./initmodel/*.pth (strict=False)
    try:
        (tmp_path / "initmodel").mkdir()
        for name in ("resnet50_v2.pth", "vgg16_bn.pth"):
            torch.save({}, tmp_path / "initmodel" / name)
        ref = aspp.OneModel(args)
    finally:
        os.chdir(cwd)
    state = _reference_state(ours)
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected, unexpected[:5]
    assert all(k.startswith("kshot_rw") or k.endswith("num_batches_tracked") for k in missing), missing[:5]
    ref.eval()
    q, s, m = _inputs(b=2, k=shots, size=65, seed=1)
    m[:, :, :20] = 255
    with torch.no_grad():
        want = ref(q, s, m, None)
        got = ours(q, s, m)
    assert got.shape == want.shape and rel_err(got, want) < 1e-5, rel_err(got, want)
    print(f"baseline {backbone} {shots}-shot vs the authors' aspp.py: relative error {rel_err(got, want):.2g}, "
          f"max abs {float((got - want).abs().max()):.2g}")
