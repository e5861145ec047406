"""The authors' recipe: deep-stem ResNet and its checkpoint layout, schedules, sampling, BAM's test protocol."""
import json
import logging
import re

import pytest
import torch
import torchvision

from conftest import make_synthetic
from pipeline.data.benchmarks import prepared_dir, split_dir
from pipeline.data.episodes import EpisodeDataset, bam_size, eval_transform
from pipeline.data.split import read_pairs
from pipeline.evaluate import IoUAccumulator, predict_bam
from pipeline.models.backbone import Backbone, load_backbone


def authors_layout(arch: str = "resnet50") -> dict:
    """A checkpoint in the layout of resnet50_v2.pth / resnet101_v2.pth, built from torchvision's key names
    and PSPNet's deep stem (conv1 3->64 stride 2, conv2 64->64, conv3 64->128, bn1..3; layer1 on 128)."""
    g = torch.Generator().manual_seed(0)
    tv = getattr(torchvision.models, arch)(weights=None).state_dict()
    state = {k: v for k, v in tv.items() if not k.startswith(("conv1.", "bn1."))}
    state["layer1.0.conv1.weight"] = torch.empty(64, 128, 1, 1)
    state["layer1.0.downsample.0.weight"] = torch.empty(256, 128, 1, 1)
    for i, (cin, cout) in enumerate(((3, 64), (64, 64), (64, 128)), start=1):
        state[f"conv{i}.weight"] = torch.empty(cout, cin, 3, 3)
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            state[f"bn{i}.{name}"] = torch.full((cout,), fill)
        state[f"bn{i}.num_batches_tracked"] = torch.tensor(0)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in state.items()}


@pytest.mark.parametrize("arch", ["resnet50_deep", "resnet101_deep"])
def test_deep_stem_loads_the_authors_layout_strictly(arch, tmp_path):
    ck = authors_layout(arch.replace("_deep", ""))
    torch.save(ck, tmp_path / "v2.pth")
    bb = load_backbone(arch, str(tmp_path / "v2.pth"))
    sd = bb.state_dict()
    assert torch.equal(sd["layer0.0.weight"], ck["conv1.weight"]) and torch.equal(sd["layer0.6.weight"], ck["conv3.weight"])
    assert torch.equal(sd["layer0.7.running_var"], ck["bn3.running_var"])
    assert torch.equal(sd["layer4.2.conv3.weight"], ck["layer4.2.conv3.weight"])
    used = len([k for k in ck if not k.startswith("fc.")])
    assert used == len(sd)                                    # every key of the file maps to one of the model
    stem = [m for m in bb.layer0 if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in stem] == [(3, 64, (2, 2)), (64, 64, (1, 1)),
                                                                          (64, 128, (1, 1))]
    bb.eval()
    x = torch.randn(1, 3, 65, 65)
    f4 = bb.layer4(bb.layer3(bb.layer2(bb.layer1(bb.layer0(x)))))
    assert f4.shape == (1, 2048, 9, 9)                         # output stride 8
    bb.train()
    assert not any(m.training for m in bb.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_deep_stem_refuses_files_that_do_not_fit(tmp_path):
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "tv.pth")
    with pytest.raises(ValueError, match=r"torchvision ResNet checkpoint .*resnet50_v2.pth"):
        load_backbone("resnet50_deep", str(tmp_path / "tv.pth"))
    ck = authors_layout()
    del ck["layer3.2.bn2.running_mean"]
    ck["extra.weight"] = torch.zeros(1)
    torch.save(ck, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"1 missing keys \['layer3.2.bn2.running_mean'\], 1 unexpected keys "
                                         r"\['extra.weight'\]"):
        load_backbone("resnet50_deep", str(tmp_path / "bad.pth"))
    torch.save(authors_layout(), tmp_path / "v2.pth")
    with pytest.raises(ValueError, match="deep-stem .* use model.backbone: resnet50_deep"):
        load_backbone("resnet50", str(tmp_path / "v2.pth"))
    with pytest.raises(FileNotFoundError, match="resnet50_v2.pth.*not downloaded by the pipeline.*model.pretrained"):
        load_backbone("resnet50_deep", "imagenet", weights_root=tmp_path)


def test_dilation_styles():
    psp = Backbone("resnet50_deep", 8, "pspnet")
    tv = Backbone("resnet50_deep", 8, "torchvision")
    # PSPNet (BAM): every conv2 of layer3 dilated by 2; torchvision (the SVF authors' PFENet): not the first
    assert [b.conv2.dilation[0] for b in psp.layer3] == [2] * 6 and [b.conv2.dilation[0] for b in psp.layer4] == [4] * 3
    assert [b.conv2.dilation[0] for b in tv.layer3] == [1] + [2] * 5 and [b.conv2.dilation[0] for b in tv.layer4] == [2, 4, 4]
    assert psp.layer3[0].downsample[0].stride == (1, 1) and tv.layer3[0].downsample[0].stride == (1, 1)
    with pytest.raises(ValueError, match="BasicBlocks"):
        Backbone("resnet18", 8, "torchvision")


def test_schedules_and_optimizer_groups(tiny_cfg):
    from pipeline.models import build_model
    from pipeline.train import lr_factor, make_optimizer
    assert [lr_factor("constant", it, 100, 0.9) for it in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert lr_factor("poly", 0, 100, 0.9) == 1.0 and abs(lr_factor("poly", 50, 100, 0.9) - 0.5 ** 0.9) < 1e-12
    tiny_cfg.train.lr, tiny_cfg.train.backbone_lr_scale, tiny_cfg.train.weight_decay = 0.015, 0.1, 1e-4
    model, _ = build_model(tiny_cfg)
    opt = make_optimizer(model, tiny_cfg.train)
    head, body = opt.param_groups
    assert head["base_lr"] == 0.015 and abs(body["base_lr"] - 0.0015) < 1e-12
    assert body["weight_decay"] == 1e-4                         # on S too, as the authors' SGD has it
    s = {id(m.S) for m in model.backbone.modules() if hasattr(m, "S")}
    assert {id(p) for p in body["params"]} == s


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = make_synthetic(tmp_path_factory.mktemp("syn"), 60, 40, seed=5, rule="pfenet")
    return prepared_dir(root, "synthetic"), split_dir(root, "synthetic", 0)


def test_image_sampling_draws_one_query_per_image_among_classes_present(synthetic):
    prepared, splits = synthetic
    pixels = json.loads((prepared / "class_pixels.json").read_text())
    pairs = EpisodeDataset(prepared, splits / "train.jsonl", 1, "train", 48)
    images = EpisodeDataset(prepared, splits / "train.jsonl", 1, "train", 48, sampling="image")
    assert len(images) == len({i for i, _ in images.pairs}) < len(pairs) == len(pairs.pairs)
    drawn_below_rule = 0
    for epoch in range(3):
        for index in range(len(images)):
            qid, cls, sup, _ = images.episode((epoch, index))
            assert qid == images.images[index] and pixels[qid][str(cls)] > 0 and cls in images.classes
            assert qid not in sup and all(s in images.by_class[cls] for s in sup)
            drawn_below_rule += pixels[qid][str(cls)] < 50
    assert drawn_below_rule > 0      # as the reference code: any class present, not only those over the pixel rule
    ep = images[0]
    assert set(ep["query_mask"].unique().tolist()) <= {0, 1, 255} and ep["support"].shape[0] == 1


def test_bam_protocol_order_sizes_and_scoring(synthetic, caplog):
    prepared, splits = synthetic
    with caplog.at_level(logging.WARNING):
        ds = EpisodeDataset(prepared, splits / "val.jsonl", 1, "test", 48, seed=510, episodes=5, protocol="bam")
    assert "shorter than the val list" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ds = EpisodeDataset(prepared, splits / "val.jsonl", 1, "test", 48, seed=510, episodes=2 * len(ds.images) + 3,
                            protocol="bam")
    assert "fewer than eval.episodes" in caplog.text and f"lower eval.episodes to {len(ds.images)}" in caplog.text
    order = [i for i, _ in ds.pairs]
    files = list(dict.fromkeys(order))
    assert [ds.episode(i)[0] for i in range(len(ds))] == [files[i % len(files)] for i in range(len(ds))]
    novel = json.loads((splits / "classes.json").read_text())["novel"]
    assert all(ds.episode(i)[1] in novel for i in range(len(ds)))
    # the authors' test size (resized_val: Resize): the longer side to 473 always (a smaller image grows, COCO's
    # 640 shrinks to 641's 640), sides floored to a multiple of 8, zero padding
    assert bam_size(500, 375, 473) == (472, 352) and bam_size(375, 500, 473) == (352, 472)
    assert bam_size(300, 200, 473) == (472, 312) and bam_size(473, 473, 473) == (472, 472)
    assert bam_size(480, 640, 641) == (480, 640) and bam_size(427, 640, 641) == (424, 640)
    img, mask, valid = eval_transform(torch.full((3, 500, 375), 200, dtype=torch.uint8),
                                      torch.ones(500, 375, dtype=torch.uint8), 473, "bam")
    assert valid == (472, 352) and img.shape == (3, 473, 473) and mask[472:].eq(255).all()
    black = (torch.zeros(3) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(img[:, 472, 0], black)
    # ori_resize: the label padded with 255 to its longer side's square, the logits upsampled to it
    logits = torch.zeros(2, 8, 8)
    logits[1, :, :4] = 1.0
    pred, label = predict_bam(logits, torch.ones(6, 3, dtype=torch.uint8))
    assert pred.shape == label.shape == (6, 6) and label[:, 3:].eq(255).all() and label[:, :3].eq(1).all()
    # mIoU divides by every novel class, a class never drawn counting 0
    acc = IoUAccumulator([1, 2, 3, 4], strict=True)
    acc.add(torch.ones(2, 2), torch.ones(2, 2), 1)
    acc.add(torch.ones(2, 2), torch.ones(2, 2), 2)
    assert acc.miou() == 0.5 and acc.never_drawn() == [3, 4]


def test_each_shot_count_scored_by_its_own_model_or_labelled():
    from pipeline.config import load_config
    from pipeline.evaluate import shot_key
    from stages.evaluate import eval_shots
    from stages.report import summary
    cfg = load_config({"train": {"shots": [1]}, "eval": {"shots": [1, 5]}})
    assert eval_shots(cfg, 1) == [1, 5] and shot_key(5, 1) == "5shot_by1" and shot_key(5, 5) == "5shot"
    cfg = load_config({"train": {"shots": [1, 5]}, "eval": {"shots": [1, 5]}})
    assert eval_shots(cfg, 1) == [1] and eval_shots(cfg, 5) == [5]
    cfg = load_config({"train": {"shots": [5]}, "eval": {"shots": [1, 5]}})
    assert eval_shots(cfg, 5) == [1, 5]

    def reports(k, keys, rel):
        ev = {key: {"miou": 50.0 + k, "miou_std": 1.0, "fbiou": 70.0} for key in keys}
        return {"evaluate": {"fold": 0, **ev}, "merge": {"max_rel": rel},
                "export": {"onnx": {"parity": {"max_rel": rel / 2}}}}
    out = summary({1: reports(1, ["1shot", "10shot_by1"], 1e-7), 5: reports(5, ["5shot"], 2e-6)})
    assert list(out) == ["1shot", "5shot", "10shot_by1", "parity"]
    assert out["5shot"]["miou"] == 55.0 and out["parity"] == 5.7       # the worse of all models: 2e-6


@pytest.mark.parametrize("bad, message", [
    ({"train": {"shots": [1, 1]}}, "train.shots: expected distinct positive shot counts"),
    ({"train": {"shots": [0]}}, "train.shots"),
    ({"train": {"schedule": "cosine"}}, "train.schedule: 'cosine' is not one of ['poly', 'constant']"),
    ({"train": {"sampling": "class"}}, "train.sampling"),
    ({"eval": {"protocol": "hsnet"}}, "eval.protocol: 'hsnet' is not one of ['random', 'bam']"),
    ({"model": {"backbone": "resnet50_v2"}}, "model.backbone: 'resnet50_v2' is not one of"),
    ({"train": {"epochs": 0, "iterations": 0}}, "train.iterations must be >= 1"),
    ({"train": {"optimizer": "adam"}}, "train.optimizer: 'adam' is not one of ['sgd', 'adamw']"),
    ({"train": {"hue_jitter": 0.7}}, "train.hue_jitter: expected 0 to 0.5"),
    ({"data": {"mirror": "file:///etc"}}, "data.mirror: 'file:///etc' is not an http:// or https:// URL"),
    ({"data": {"mirror": "ftp://host/x"}}, "is not an http:// or https:// URL"),
])
def test_recipe_parameters_are_validated(bad, message):
    from pipeline.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(bad)


def test_too_few_images_for_the_shot_count(synthetic, caplog):
    prepared, splits = synthetic
    with caplog.at_level(logging.WARNING):
        ds = EpisodeDataset(prepared, splits / "val.jsonl", 5, "test", 48, episodes=4)
    skipped = sorted({c for _, c in read_pairs(splits / "val.jsonl")} - set(ds.classes))
    assert skipped and f"classes {skipped} have fewer than 6 images" in caplog.text
    with pytest.raises(ValueError, match="no 100-shot episode can be formed; lower the shot count or add images"):
        EpisodeDataset(prepared, splits / "val.jsonl", 100, "test", 48, episodes=4)
