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
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture
def tiny_cfg():
    from pipeline.config import load_config
    return load_config({"model": {"backbone": "resnet18", "pretrained": "random", "reduce_dim": 32,
                                  "bins": [1.0, 0.5, 0.25]}})


def small_merged_model(backbone: str, size: int, **cfg):
    """A random PFENet on ``backbone`` (reduce_dim 16, bins 1 and 0.5), its singular values moved off 1 so
    that the merge is not trivial, merged to dense convs; returns (merged model, its config)."""
    from pipeline.config import load_config
    from pipeline.models import build_model
    from pipeline.svf import SVFConv2d, merge_svf
    cfg = load_config({"model": {"backbone": backbone, "pretrained": "random", "reduce_dim": 16, "bins": [1.0, 0.5]},
                       "eval": {"test_size": size}, **cfg})
    model, _ = build_model(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SVFConv2d):
                m.S.mul_(1.05)
    return merge_svf(model).eval(), cfg


def make_synthetic(root: Path, num_train: int, num_val: int, seed: int, rule: str = "bam", min_pixels: int = 50) -> Path:
    """A small prepared synthetic benchmark with fold 0 split under ``root``; returns ``root``."""
    from pipeline.config import SyntheticCfg
    from pipeline.data import sources
    from pipeline.data.benchmarks import prepared_dir, protocol_folds, split_dir
    from pipeline.data.prepare import prepare
    from pipeline.data.split import make_splits
    raw = sources.fetch_benchmark("synthetic", root, synthetic=SyntheticCfg(num_train=num_train, num_val=num_val,
                                                                           image_size=64, seed=seed), workers=1)
    prepare("synthetic", raw, prepared_dir(root, "synthetic"), workers=1)
    make_splits(prepared_dir(root, "synthetic"), split_dir(root, "synthetic"), protocol_folds("synthetic", [0]), min_pixels,
                rule)
    return root


def copy_project(dst: Path) -> None:
    """The checkout's files (tracked and untracked-not-ignored) copied to ``dst``, without this checkout's outputs."""
    import shutil
    import subprocess
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    outputs = ("data/", "models/", "metrics/", "plots/", "results/", "checkpoints/", "mlartifacts/", "dvc.lock")
    for f in filter(None, files):
        if f.startswith(outputs):          # results of this checkout's own runs stay behind
            continue
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def doc_text(marker: str) -> tuple[str, str]:
    """(page, text after ``<!-- marker -->``) from the README or the documentation site (docs/): a command
    block the tests execute is found wherever it moves."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    hits = [(p, p.read_text().split(f"<!-- {marker} -->", 1)[1]) for p in pages if f"<!-- {marker} -->" in p.read_text()]
    assert len(hits) == 1, f"<!-- {marker} --> must stand on exactly one page, found on {[str(p) for p, _ in hits]}"
    return str(hits[0][0].relative_to(ROOT)), hits[0][1]


def doc_block(marker: str) -> list[str]:
    """The shell commands of the code block that follows ``<!-- marker -->`` (README or docs/)."""
    block = doc_text(marker)[1].split("```", 2)[1]
    return [line.split("  #")[0].strip() for line in block.splitlines()[1:] if line.strip()
            and not line.strip().startswith("#")]
