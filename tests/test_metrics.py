import math

import pytest
import torch

from pipeline.evaluate import IoUAccumulator, predict_original, summarise


def t(x):
    return torch.tensor(x)


def test_iou_pooled_over_episodes_not_averaged():
    acc = IoUAccumulator([1, 2])
    # episode 1 (class 1): the 255 pixel is ignored -> I=1, U=2
    acc.add(t([1, 1, 0, 1]), t([1, 0, 0, 255]), 1)
    # episode 2 (class 1): I=3, U=4
    acc.add(t([1, 1, 1, 0]), t([1, 1, 1, 1]), 1)
    # episode 3 (class 2): I=0, U=1
    acc.add(t([0, 0, 0, 0]), t([0, 1, 0, 0]), 2)
    ious = acc.class_iou()
    assert ious[1] == pytest.approx(4 / 6)          # pooled; the per-episode mean would be 0.625
    assert ious[2] == 0.0
    assert acc.miou() == pytest.approx((4 / 6 + 0) / 2)
    # background: ep1 I=1 U=2, ep2 I=0 U=1, ep3 I=3 U=4 -> 4/7; foreground: I=4, U=7
    assert acc.fbiou() == pytest.approx((4 / 7 + 4 / 7) / 2)
    assert acc.episodes == 3


def test_classes_without_episodes_do_not_count_and_empty_is_nan():
    acc = IoUAccumulator([1, 2, 3])
    acc.add(t([1, 0]), t([1, 0]), 3)
    assert acc.class_iou() == {3: 1.0} and acc.miou() == 1.0
    assert math.isnan(IoUAccumulator([1]).miou())


def test_prediction_scored_at_original_resolution():
    # a 4x4 padded test image whose valid region is 2x4 (original 3x6 image, longer side 6 -> 4)
    logits = torch.zeros(2, 4, 4)
    logits[1, :2, :2] = 5.0        # object on the left half of the valid region
    logits[1, 2:, :] = 9.0         # padding rows: must be ignored
    pred = predict_original(logits, (2, 4), (3, 6))
    assert pred.shape == (3, 6)
    assert pred[:, :2].eq(1).all() and pred[:, 4:].eq(0).all()


def test_summary_mean_and_spread_over_seeds():
    a, b = IoUAccumulator([1]), IoUAccumulator([1])
    a.add(t([1, 1]), t([1, 1]), 1)      # 100 %
    b.add(t([1, 0]), t([1, 1]), 1)      # 50 %
    s = summarise([a, b])
    assert s["miou"] == pytest.approx(75.0) and s["miou_std"] == pytest.approx(25.0)
    assert s["miou_min"] == 50.0 and s["miou_max"] == 100.0 and s["per_seed_miou"] == [100.0, 50.0]
    assert s["per_class_iou"] == {"1": pytest.approx(75.0)}


def _random_episodes(rng, n, classes, acc=None, better=0):
    """n random episodes of 6x6 masks; ``better`` extra correct pixels per episode."""
    acc = acc or IoUAccumulator(classes)
    for i in range(n):
        label = torch.from_numpy(rng.integers(0, 2, 36)).view(6, 6)
        pred = torch.from_numpy(rng.integers(0, 2, 36)).view(6, 6)
        flat = pred.view(-1)
        wrong = (flat != label.view(-1)).nonzero().flatten()[:better]
        flat[wrong] = label.view(-1)[wrong]
        acc.add(pred, label, classes[i % len(classes)])
    return acc


def test_ablation_statistics_pool_like_the_protocol_and_pair_episodes():
    import numpy as np

    from pipeline.ablation import paired_difference, pooled_miou
    classes = [1, 2, 3]
    a = _random_episodes(np.random.default_rng(0), 60, classes)
    rec = np.asarray(a.records)
    assert rec.shape == (60, 3) and pooled_miou(rec, classes)[0] == pytest.approx(a.miou())
    # a bootstrap row that repeats episode 0 pools only its class
    assert pooled_miou(rec, classes, np.zeros((1, 60), dtype=int))[0] == pytest.approx(rec[0, 1] / rec[0, 2])
    same = paired_difference([rec], [rec.copy()], classes)
    assert same == {"mean": 0.0, "ci95": [0.0, 0.0]}
    b = _random_episodes(np.random.default_rng(0), 60, classes, better=4)   # the same episodes, 4 pixels better
    d = paired_difference([np.asarray(b.records)], [rec], classes)
    assert d["mean"] == pytest.approx(100 * (b.miou() - a.miou()), abs=0.01) and d["mean"] > 0
    assert 0 < d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    with pytest.raises(ValueError, match="same episodes"):
        paired_difference([rec], [rec[::-1].copy()], classes)
