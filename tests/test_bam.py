"""BAM: shapes, the k-shot reweighting, the ensemble at initialisation, the base-class exclusion, BN,
SVF on the meta branch only, and (given a checkout of chunbolang/BAM) forward parity with the reference."""
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import reference_name, rel_err
from pipeline.config import load_config
from pipeline.models import BAM, build_model, head_loss, train_inputs


def bam_cfg(regime="frozen", backbone="resnet10_slim", **model):
    return load_config({"model": {"head": "bam", "backbone": backbone, "pretrained": "random", "reduce_dim": 32,
                                  "finetune": regime, **model}})


def _inputs(b=2, k=1, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, size, size, generator=g), torch.randn(b, k, 3, size, size, generator=g),
            (torch.rand(b, k, size, size, generator=g) > 0.6).float())


def _base_map(model, q, exclude=None):
    """The base map as the ensemble sees it (at layer4's resolution), brought to the input size."""
    from pipeline.models.layers import features, resize
    with torch.no_grad():
        p = model.base.classify(features(model.backbone, q)[2]).softmax(1)
    keep = torch.ones(p.shape[:2])
    keep[:, 0] = 0
    if exclude is not None:
        keep[torch.arange(len(exclude)), exclude] = 0
    return resize((p * keep[:, :, None, None]).sum(1, keepdim=True), q.shape[-2:])[:, 0]


def _bam(regime="frozen", shots=1, classes=16, **kw):
    model, counts = build_model(bam_cfg(regime, **kw), base={"classes": classes}, shots=shots)
    return model, counts


@pytest.mark.parametrize("shots", [1, 5])
def test_output_shapes(shots):
    model, _ = _bam(shots=shots)
    q, s, m = _inputs(k=shots)
    with torch.no_grad():
        assert model.eval()(q, s, m).shape == (2, 2, 64, 64)
    out = model.train()(q, s, m, base_class=torch.tensor([1, 2]))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"logits": (2, 2, 64, 64), "meta": (2, 2, 64, 64),
                                                           "base": (2, 16, 64, 64)}


def test_one_shot_reweighting_is_the_identity_and_a_k_shot_model_needs_k():
    model, _ = _bam(shots=1)
    est = torch.rand(3, 1)
    assert torch.equal(model.shot_weights(est), torch.ones(3, 1))
    five, _ = _bam(shots=5)
    w = five.shot_weights(torch.rand(3, 5))
    assert w.shape == (3, 5) and torch.allclose(w.sum(1), torch.ones(3))
    with pytest.raises(ValueError, match="trained with 5 shots"):
        five.shot_weights(torch.rand(3, 2))
    # the weights follow the supports: permuting the supports permutes the weights
    est = torch.rand(2, 5)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(five.shot_weights(est[:, perm]), five.shot_weights(est)[:, perm], atol=1e-6)


def test_ensemble_at_initialisation():
    """gram_merge = [1, 0], cls_merge = [1, 0]: the output is [meta background, meta foreground]; est and
    the base map enter only through weights that start at 0."""
    model, _ = _bam()
    assert model.gram_merge.weight.flatten().tolist() == [1.0, 0.0]
    assert model.cls_merge.weight.flatten().tolist() == [1.0, 0.0]
    q, s, m = _inputs()
    model.train()
    for mod in model.modules():
        if isinstance(mod, nn.Dropout2d):
            mod.p = 0.0
    out = model(q, s, m, base_class=torch.tensor([1, 2]))
    assert torch.allclose(out["logits"], out["meta"].softmax(1), atol=1e-6)
    with torch.no_grad():   # est adjusts both maps, the base map only the background
        model.gram_merge.weight.copy_(torch.tensor([1.0, 0.5]).view(1, 2, 1, 1))
        model.cls_merge.weight.copy_(torch.tensor([1.0, 1.0]).view(1, 2, 1, 1))
    out2 = model(q, s, m, base_class=torch.tensor([1, 2]))
    shift = (out2["logits"][:, 1] - out["logits"][:, 1]).detach()      # + 0.5 est: one value per image
    assert float(shift.flatten(1).std(1).max()) < 1e-5 and float(shift.min()) > 0
    base_map = _base_map(model, q, exclude=torch.tensor([1, 2]))   # the episodes' own classes, in training
    assert torch.allclose(out2["logits"][:, 0], out["logits"][:, 0] + shift + base_map, atol=1e-5)


def test_episode_class_excluded_from_base_map_in_training_only():
    model, _ = _bam()
    with torch.no_grad():
        model.cls_merge.weight.copy_(torch.tensor([0.0, 1.0]).view(1, 2, 1, 1))   # output background = base map
    for mod in model.modules():
        if isinstance(mod, nn.Dropout2d):
            mod.p = 0.0
    q, s, m = _inputs()
    model.train()
    out = model(q, s, m, base_class=torch.tensor([3, 7]))
    assert torch.allclose(out["logits"][:, 0], _base_map(model, q, exclude=torch.tensor([3, 7])), atol=1e-5)
    assert not torch.allclose(out["logits"][:, 0], _base_map(model, q), atol=1e-3)
    model.eval()
    with torch.no_grad():
        test = model(q, s, m, base_class=torch.tensor([3, 7]))
    assert torch.allclose(test[:, 0], _base_map(model, q), atol=1e-5)


def test_bn_stays_in_eval_mode_and_svf_trains_only_the_meta_branch():
    model, counts = _bam("svf")
    model.train()
    assert model.aspp.training
    assert all(not mod.training for mod in model.modules() if isinstance(mod, nn.BatchNorm2d))
    assert not model.shared_backbone
    q, s, m = _inputs()
    batch = {"query_mask": (torch.rand(2, 64, 64) > 0.5).long(), "query_base": torch.randint(0, 16, (2, 64, 64)),
             "base_class": torch.tensor([1, 2])}
    loss, parts = head_loss(model, model(q, s, m, **train_inputs(model, batch)), batch)
    loss.backward()
    assert set(parts) == {"main_loss", "aux_loss", "base_loss"}
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert all(n.endswith(".S") for n in grads if n.startswith("backbone."))
    assert any(n.startswith("backbone.") for n in grads)
    assert not any(n.startswith("base.") for n in grads)
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters()
                                      if n.startswith("backbone.") and p.requires_grad)


def test_svf_at_initialisation_equals_frozen():
    frozen, _ = _bam("frozen")
    svf, _ = _bam("svf")
    assert frozen.shared_backbone and not svf.shared_backbone
    q, s, m = _inputs(k=1)
    with torch.no_grad():
        assert rel_err(svf.eval()(q, s, m), frozen.eval()(q, s, m)) < 1e-5


def test_unknown_head_and_missing_base_learner():
    from pipeline.config import ConfigError
    with pytest.raises(ConfigError, match="'pfenet', 'bam'"):
        load_config({"model": {"head": "hsnet"}})
    with pytest.raises(ValueError, match=r"dvc repro base@<fold>"):
        build_model(bam_cfg())


# ------------------------------------------------------------------ parity with chunbolang/BAM
REFERENCE = os.environ.get("SVF_FSS_BAM_REPO", "")


def _reference_model(repo: Path, workdir: Path, shots: int):
    """chunbolang/BAM's OneModel (model/BAM.py), built in ``workdir`` from its own files."""
    sys.path.insert(0, str(repo))
    for name in ("cv2",):   # imported at the top of model/*.py, never called by the forward pass
        sys.modules.setdefault(name, types.ModuleType(name))
    util = types.ModuleType("util.util")
    util.get_train_val_set = None
    sys.modules.setdefault("util", types.ModuleType("util"))
    sys.modules["util.util"] = util
    from model.BAM import OneModel
    from model.PSPNet import OneModel as RefPSPNet
    args = types.SimpleNamespace(layers=50, zoom_factor=8, shot=shots, vgg=False, data_set="pascal", ignore_label=255,
                                 print_freq=10, split=0, low_fea="layer2", kshot_trans_dim=2)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        (workdir / "initmodel/PSPNet/pascal/split0/resnet50").mkdir(parents=True, exist_ok=True)
        torch.save({}, workdir / "initmodel/resnet50_v2.pth")
        torch.save({"state_dict": RefPSPNet(args).state_dict()}, workdir / "initmodel/PSPNet/pascal/split0/resnet50/best.pth")
        return OneModel(args, cls_type="Base")
    finally:
        os.chdir(cwd)


def _reference_state(ours: BAM) -> dict:
    """Our state_dict in the reference's names."""
    out = {}
    for k, v in ours.state_dict().items():
        if k.startswith("base.backbone."):
            continue
        if k.startswith("base.ppm.features."):
            i, j, rest = k[len("base.ppm.features."):].split(".", 2)
            k = f"learner_base.0.features.{i}.{int(j) + 1}.{rest}"
        elif k.startswith("base.cls."):
            k = "learner_base.1." + k[len("base.cls."):]
        out[reference_name(k)] = v
    return out


@pytest.mark.skipif(not REFERENCE, reason="set SVF_FSS_BAM_REPO to a checkout of github.com/chunbolang/BAM "
                                          "to compare the forward pass with the reference")
@pytest.mark.parametrize("shots", [1, 2])
def test_forward_parity_with_reference(tmp_path, shots):
    torch.manual_seed(0)
    ours, _ = build_model(bam_cfg("frozen", "resnet50_deep", reduce_dim=256), base={"classes": 16}, shots=shots)
    ours.eval()
    with torch.no_grad():   # non-trivial ensemble weights and BN statistics, so every path shows
        ours.gram_merge.weight.copy_(torch.tensor([0.8, 0.6]).view(1, 2, 1, 1))
        ours.cls_merge.weight.copy_(torch.tensor([0.9, 0.7]).view(1, 2, 1, 1))
        for mod in ours.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    ref = _reference_model(Path(REFERENCE), tmp_path, shots)
    state = _reference_state(ours)
    ref_keys = set(ref.state_dict())
    missing = ref_keys - set(state)
    assert not (set(state) - ref_keys), sorted(set(state) - ref_keys)[:5]
    assert all(k.startswith("learner_base.") is False for k in missing) or not missing
    ref.load_state_dict(state, strict=False)
    assert not [k for k in missing if not k.endswith("num_batches_tracked")]
    ref.eval()
    q, s, m = _inputs(b=2, k=shots, size=65, seed=1)
    m[:, :, :20] = 255
    with torch.no_grad():
        final, meta, base = ref(q, s, m, None, None)
        mine = ours(q, s, m)
    assert mine.shape == final.shape
    assert rel_err(mine, final) < 1e-5, rel_err(mine, final)


# ------------------------------------------------------------------ merge, export, artifacts
def _trained_svf_bam(shots):
    model, _ = _bam("svf", shots=shots)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():   # as if trained: S moved, the ensemble and reweighting away from their init
        for n, p in model.named_parameters():
            if n.endswith(".S"):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
        model.gram_merge.weight.copy_(torch.tensor([0.9, 0.4]).view(1, 2, 1, 1))
        model.cls_merge.weight.copy_(torch.tensor([1.1, 0.6]).view(1, 2, 1, 1))
    return model.eval()


@pytest.mark.parametrize("shots", [1, 3])
def test_merge_and_onnx_parity(tmp_path, shots):
    import copy

    from export import onnx_export
    from pipeline.svf import SVFConv2d, merge_svf
    model = _trained_svf_bam(shots)
    merged = merge_svf(copy.deepcopy(model)).eval()
    assert not any(isinstance(m, SVFConv2d) for m in merged.modules())
    assert not torch.equal(merged.backbone.layer3[0].conv2.weight, merged.base.backbone.layer3[0].conv2.weight)
    q, s, m = _inputs(k=shots, size=64)
    with torch.no_grad():
        ref, got = model(q, s, m), merged(q, s, m)
    assert rel_err(got, ref) < 1e-5
    assert onnx_export.pick_exporter("auto", merged) == "dynamo"     # export.exporter's default for BAM
    path = onnx_export.export_onnx(merged, tmp_path / "model.onnx", 64)
    episodes = [_inputs(b=b, k=shots, size=64, seed=b) for b in (1, 2)]
    if shots == 1:   # a 1-shot model takes any number of supports (equal weights): the shots axis stays dynamic
        episodes.append(_inputs(b=1, k=4, size=64, seed=5))
        assert onnx_export.check_parity(merged, onnx_export.session(path, prefer_cuda=False), episodes, 1e-4)["max_rel"] < 1e-4
        return
    enc, dec = onnx_export.export_split(merged, tmp_path, 64, metadata={"input_size": [64, 64]})
    for sess in (onnx_export.session(path, prefer_cuda=False), onnx_export.SplitSession(enc, dec, prefer_cuda=False)):
        assert onnx_export.check_parity(merged, sess, episodes, 1e-4)["max_rel"] < 1e-4
    split = onnx_export.SplitSession(enc, dec, prefer_cuda=False)
    assert split.features == ["prototype", "support_feat4", "support_gram"]

    # the service's backends serve BAM as they serve PFENet; a K-shot model says it takes exactly K
    from pipeline import adapter as adapter_io
    from serving.backends import OnnxBackend, TorchBackend
    cfg = load_config({**bam_cfg("svf").to_dict(), "eval": {"test_size": 64}})
    adapter_io.save(adapter_io.merged_state(merged, cfg), tmp_path / "merged.pt")
    q, s, m = _inputs(b=1, k=shots, size=64, seed=9)
    with torch.no_grad():
        ref = merged(q, s, m).numpy()
    for backend in (OnnxBackend(tmp_path), TorchBackend(tmp_path, "cpu")):
        assert backend.size == 64 and backend.shots == shots
        got = backend.decode(q.numpy(), backend.encode(s.numpy(), m.numpy()))
        assert onnx_export.rel_error(got, ref) < 1e-4


def test_merged_and_adapter_round_trip(tmp_path):
    import copy

    from pipeline import adapter as adapter_io
    from pipeline.svf import merge_svf
    cfg = bam_cfg("svf")
    model = _trained_svf_bam(1)
    merged = merge_svf(copy.deepcopy(model)).eval()
    adapter_io.save(adapter_io.merged_state(merged, cfg), tmp_path / "merged.pt")
    back, _ = adapter_io.load_merged(tmp_path / "merged.pt")
    q, s, m = _inputs()
    with torch.no_grad():
        assert torch.equal(back(q, s, m), merged(q, s, m))
    state = adapter_io.adapter_state(model, cfg, {"shots": 1})
    assert not any(k.startswith("base.") for k in state["head"])
    assert all(k.endswith(".S") for k in state["backbone"]) and state["backbone"]


def test_base_checkpoint_of_another_fold_classes_or_backbone_is_refused(tmp_path):
    from pipeline import adapter as adapter_io
    from pipeline.models import base_learner
    cfg = bam_cfg("frozen")
    learner = base_learner(cfg.model, 16)
    path = adapter_io.save(adapter_io.base_state(learner, cfg, 0, list(range(6, 21))), tmp_path / "base.pt")
    assert adapter_io.read_base(path, cfg, 0)["classes"] == 16
    with pytest.raises(ValueError, match=r"fold 0 \(expected 1\)"):
        adapter_io.read_base(path, cfg, 1)
    with pytest.raises(ValueError, match=r"backbone 'resnet10_slim' \(expected 'resnet34'\).*base@0"):
        adapter_io.read_base(path, bam_cfg("frozen", backbone="resnet34"), 0)
    coco = load_config({"data": {"benchmark": "coco"}, "model": cfg.to_dict()["model"]})
    with pytest.raises(ValueError, match=r"classes 16 \(expected 61\)"):
        adapter_io.read_base(path, coco, 0)
    with pytest.raises(FileNotFoundError, match=r"dvc repro base@0"):
        adapter_io.read_base(tmp_path / "none.pt", cfg, 0)
