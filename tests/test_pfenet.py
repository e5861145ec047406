import pytest
import torch
import torch.nn as nn

from conftest import rel_err
from pipeline.models import build_model, pfenet_loss, prior_mask


def _inputs(b=2, k=1, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 3, size, size, generator=g)
    s = torch.randn(b, k, 3, size, size, generator=g)
    m = (torch.rand(b, k, size, size, generator=g) > 0.6).float()
    return q, s, m


@pytest.mark.parametrize("shots", [1, 5])
def test_output_shapes(tiny_cfg, shots):
    model, _ = build_model(tiny_cfg)
    model.eval()
    q, s, m = _inputs(k=shots)
    with torch.no_grad():
        out = model(q, s, m)
    assert out.shape == (2, 2, 64, 64)
    model.train()
    out = model(q, s, m)
    assert out["logits"].shape == (2, 2, 64, 64)
    assert len(out["aux"]) == len(tiny_cfg.model.bins)
    assert all(a.shape == (2, 2, 64, 64) for a in out["aux"])


def test_five_identical_shots_equal_one_shot(tiny_cfg):
    model, _ = build_model(tiny_cfg)
    model.eval()
    q, s, m = _inputs(k=1)
    with torch.no_grad():
        one = model(q, s, m)
        five = model(q, s.expand(-1, 5, -1, -1, -1).contiguous(), m.expand(-1, 5, -1, -1).contiguous())
    assert rel_err(five, one) < 1e-5


def test_prior_in_unit_interval(tiny_cfg):
    model, _ = build_model(tiny_cfg)
    model.train()
    for k in (1, 3):
        q, s, m = _inputs(k=k)
        prior = model(q, s, m)["prior"]
        assert prior.min() >= 0 and prior.max() <= 1
    assert prior.max() > 0.3
    p = prior_mask(torch.randn(3, 16, 5, 7), torch.randn(3, 16, 4, 4))
    assert p.shape == (3, 1, 5, 7) and float(p.min()) >= 0 and float(p.max()) <= 1


def test_backbone_bn_stays_eval_and_loss_backprops(tiny_cfg):
    model, counts = build_model(tiny_cfg)
    model.train()
    assert model.down_query.training
    assert all(not m.training for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    q, s, m = _inputs(k=1)
    target = (torch.rand(2, 64, 64) > 0.5).long()
    target[:, :4] = 255
    loss, parts = pfenet_loss(model(q, s, m), target)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [n for n, p in model.backbone.named_parameters() if p.grad is not None]
    assert grads and all(n.endswith(".S") for n in grads)
    assert counts["trainable"] > 0 and counts["head"] > 0


def test_output_stride_8_on_resnet50_and_bad_shapes():
    from pipeline.config import load_config
    cfg = load_config({"model": {"backbone": "resnet50", "pretrained": "random", "reduce_dim": 16, "bins": [1.0],
                                 "finetune": "frozen"}})   # no SVD: the test is about strides and shapes
    model, counts = build_model(cfg)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    bb = model.backbone
    with torch.no_grad():
        f4 = bb.layer4(bb.layer3(bb.layer2(bb.layer1(bb.layer0(x)))))
    assert f4.shape == (1, 2048, 8, 8)
    with pytest.raises(ValueError, match="support mask size"):
        model(x, x.unsqueeze(1), torch.zeros(1, 1, 32, 32))


@pytest.mark.parametrize("n_in,n_out", [(60, 8), (60, 15), (16, 16), (13, 5), (7, 9)])
def test_matrix_pooling_equals_adaptive_avg_pool(n_in, n_out):
    import torch.nn.functional as F
    from pipeline.models.pfenet import adaptive_pool
    x = torch.randn(2, 3, n_in, n_in + 1)
    ref = F.adaptive_avg_pool2d(x, n_out)
    assert torch.allclose(adaptive_pool(x, n_out), ref, atol=1e-5)
