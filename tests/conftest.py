import logging
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
logging.getLogger("pipeline.models.backbone").setLevel(logging.ERROR)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture
def tiny_cfg():
    from pipeline.config import load_config
    return load_config({"model": {"backbone": "resnet18", "pretrained": "random", "reduce_dim": 32,
                                  "bins": [1.0, 0.5, 0.25]}})
