import logging
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# the cores shared among pytest-xdist's workers: more threads than cores makes torch's OpenMP spin, not run
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
torch.set_num_threads(_THREADS)
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))   # and so every stage, server and command a test starts
logging.getLogger("pipeline.models.backbone").setLevel(logging.ERROR)


# The suite's two tiers. `make test` runs everything on every core (pytest-xdist); `make test-fast` leaves
# out the tests marked slow: those that run DVC, start a server, build the C++ program, train, or export
# through the dynamo exporter (the inner loop's unit tier, about a minute).
SLOW_MODULES = {"test_pipeline", "test_cpp", "test_serving", "test_labelstudio", "test_entry_points", "test_released",
                "test_released_parity", "test_cuda"}
SLOW_TESTS = {"test_presets.py::test_every_preset_parses_and_dvc_repro_dry_lists_every_stage",
              "test_presets.py::test_a_bad_preset_is_named_and_params_yaml_is_kept",
              "test_presets.py::test_a_preset_runs_end_to_end_on_a_miniature",
              "test_dvc_yaml.py::test_one_training_stage_per_fold_and_shot_count",
              "test_bam.py::test_merge_and_onnx_parity",
              "test_export.py::test_onnx_parity_one_and_five_shots_and_metadata"}
# Modules first that hold the longest tests, so that no worker starts one of them last.
FIRST = ("test_pipeline", "test_presets", "test_cpp", "test_bam", "test_export", "test_serving", "test_labelstudio")
LONGEST = ("test_dvc_repro_end_to_end_with_mlflow", "test_a_preset_runs_end_to_end_on_a_miniature")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: DVC, a server, the C++ build, training or a dynamo export "
                                       "(left out by `make test-fast`)")


@pytest.hookimpl(tryfirst=True)   # before xdist reads the groups (its worker plugin registers after this file)
def pytest_collection_modifyitems(config, items):
    """Mark the slow tier; keep the tests that share one of their module's fixtures on one xdist worker (the
    fixture is built once); start with the modules whose tests take longest. Order inside a module is kept."""
    for item in items:
        module = item.module.__name__
        name = f"{module}.py::{item.originalname}"
        if module in SLOW_MODULES or name in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        shared = [d[-1] for d in item._fixtureinfo.name2fixturedefs.values()
                  if d and d[-1].scope == "module" and d[-1].baseid.endswith(f"{module}.py")]
        if shared and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(module))
            if getattr(config.option, "loadgroup", False) and "@" not in item.nodeid:
                # pytest 9.2 reads a node's id from _id, where xdist 3.8 still writes _nodeid: name the group
                # in the id as xdist means to, or the module's tests (and their fixture) spread over workers
                from _pytest.nodeid import NodeId
                item._id = NodeId.parse(f"{item.nodeid}@{module}")
    rank = {m: i for i, m in enumerate(FIRST)}
    items.sort(key=lambda it: (rank.get(it.module.__name__, len(FIRST)), it.originalname not in LONGEST))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture
def tiny_cfg():
    from pipeline.config import load_config
    return load_config({"model": {"backbone": "resnet10_slim", "pretrained": "random", "reduce_dim": 32,
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
    from stages.rehearse import copy_project as copy
    copy(dst, ROOT)


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


# our meta learner's module names -> those of the reference code's OneModel (chunbolang/BAM model/BAM.py and the SVF
# authors' model/aspp.py name it alike)
from pipeline.released import ASPP_NAMES  # noqa: E402  (the reference's names of our ASPP and residual blocks)


def reference_name(key: str) -> str:
    """A key of our meta learner or backbone (``backbone.`` dropped) in the reference's names."""
    key = key[len("backbone."):] if key.startswith("backbone.") else key
    for a, b in ASPP_NAMES.items():
        if key.startswith(a):
            return b + key[len(a):]
    return key

