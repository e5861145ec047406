"""What only a GPU shows: SVF and its merge exact on CUDA, both heads equal on CPU and CUDA, and AMP
training through the pipeline's own loops (base learner, BAM, PFENet) with finite losses and only S
and the heads moving. Skipped without CUDA (CI has none): `pytest tests/test_cuda.py` on a GPU machine.
"""
import pytest
import torch

from conftest import make_synthetic, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 matrix units round inputs to 10 bits: off, so that float32 means float32 here."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _model(head: str, form: str = "rebuild"):
    from pipeline.config import load_config
    from pipeline.models import build_model
    from pipeline.svf import SVFConv2d
    cfg = load_config({"model": {"head": head, "backbone": "resnet50", "pretrained": "random", "svf_form": form,
                                 "reduce_dim": 32, "bins": [1.0, 0.5]}})
    model, _ = build_model(cfg, base={"classes": 16} if head == "bam" else None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():      # singular values off their decomposition, so that the merge is not trivial
        for m in model.modules():
            if isinstance(m, SVFConv2d):
                m.S.mul_(1 + 0.1 * torch.rand(m.S.shape, generator=g))
    return model.eval()


def _episode(size=97, shots=2, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, shots, 3, size, size, generator=g),
            (torch.rand(batch, shots, size, size, generator=g) > 0.5).float())


@pytest.mark.parametrize("form", ["rebuild", "factorised"])
def test_svf_and_its_merge_are_exact_on_cuda(form):
    """float64 on the GPU: unmerged (either form) and merged give the same logits to rounding."""
    from pipeline.svf import SVFConv2d, merge_svf
    model = _model("pfenet", form).double().to(CUDA)
    q, s, m = (t.double().to(CUDA) for t in _episode())
    with torch.no_grad():
        unmerged = model(q, s, m)
        merged = merge_svf(model)
        assert not any(isinstance(x, SVFConv2d) for x in merged.modules())
        assert rel_err(merged(q, s, m), unmerged) < 1e-12


@pytest.mark.parametrize("head", ["pfenet", "bam"])
def test_cpu_and_cuda_give_the_same_logits(head):
    model = _model(head)
    episode = _episode(seed=2)
    with torch.no_grad():
        cpu = model(*episode)
        gpu = model.to(CUDA)(*(t.to(CUDA) for t in episode)).cpu()
    assert rel_err(gpu, cpu) < 1e-4, "float32 on CUDA (TF32 off) against the CPU"


def test_amp_fp16_forward_stays_close_to_float32():
    """Under autocast the rebuilt weight U diag(S) V^T is a half-precision product: the logits move by
    half precision's rounding, not more (the model's last upsampling returns them in float32)."""
    model = _model("pfenet").to(CUDA)
    episode = [t.to(CUDA) for t in _episode(seed=3)]
    with torch.no_grad():
        full = model(*episode)
        with torch.autocast("cuda", dtype=torch.float16):
            half = model(*episode)
    assert torch.isfinite(half).all()
    assert 0 < rel_err(half.float(), full) < 2e-2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("cuda_data"), 48, 30, seed=0)


def _cfg(root, **model):
    from pipeline.config import load_config
    return load_config({
        "data": {"root": str(root), "workers": 1},
        "model": {"backbone": "resnet18", "pretrained": "random", "reduce_dim": 16, "bins": [1.0, 0.5],
                  "finetune": "svf", **model},
        "train": {"iterations": 12, "batch_size": 4, "crop_size": 64, "val_every": 6, "val_episodes": 6,
                  "checkpoint_every": 6, "log_every": 2, "workers": 0, "lr": 0.005, "amp": True, "device": "cuda"},
        "base": {"iterations": 8, "batch_size": 4, "crop_size": 64, "val_every": 4, "val_images": 6,
                 "checkpoint_every": 4, "log_every": 2, "workers": 0, "amp": True},
        "eval": {"test_size": 64}})


def _trained_moved_only_s_and_head(cfg, adapter_path, base=None):
    """Every tensor finite; the adapter holds only S of layer2-4 and head tensors, and S moved."""
    from pipeline.models import build_model
    adapter = torch.load(adapter_path, weights_only=True, map_location="cpu")
    tensors = {**adapter["head"], **adapter["backbone"]}
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    stages = ("backbone.layer2", "backbone.layer3", "backbone.layer4")
    assert adapter["backbone"] and all(k.endswith(".S") and k.startswith(stages) for k in adapter["backbone"])
    fresh, _ = build_model(cfg, base=base)
    init = fresh.state_dict()
    moved = [k for k, v in adapter["backbone"].items() if not torch.equal(v, init[k])]
    assert moved, "no singular value changed in training"


def test_amp_training_on_cuda_base_bam_and_pfenet(data_root, tmp_path, monkeypatch):
    """The base stage, then BAM + SVF and PFENet + SVF, each with AMP fp16 and a GradScaler on CUDA."""
    from pipeline import adapter as adapter_io
    from pipeline.train import train
    from pipeline.train_base import train_base
    monkeypatch.chdir(tmp_path)
    bam = _cfg(data_root, head="bam", dilation="pspnet")
    base = train_base(bam, 0, tmp_path / "base", tmp_path / "plots_base")
    assert base["device"].startswith("cuda") and 0 <= base["base_miou"] <= 100
    for cfg, name in ((bam, "bam"), (_cfg(data_root), "pfenet")):
        summary = train(cfg, 0, 1, tmp_path / name, tmp_path / f"plots_{name}",
                        base_file=tmp_path / "base" / "base.pt" if name == "bam" else None)
        assert summary["device"].startswith("cuda") and summary["iterations"] == 12
        assert 0 <= summary["best_val_miou"] <= 100
        state = adapter_io.read_base(tmp_path / "base" / "base.pt", cfg, 0) if name == "bam" else None
        _trained_moved_only_s_and_head(cfg, tmp_path / name / "adapter.pt", state)
        rows = (tmp_path / f"plots_{name}" / "train.csv").read_text().splitlines()[1:]
        losses = [float(r.split(",")[1]) for r in rows]
        assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_the_services_cuda_graphs_decode_as_the_eager_model(tmp_path):
    """serving's torch backend replays a CUDA graph per shape: fresh inputs each call (the static buffers
    are refilled), batch-1 features shared by a batch, and a new shape, all equal to eager decoding."""
    import numpy as np

    from conftest import small_merged_model
    from pipeline import adapter as adapter_io
    from serving.backends import Backend, TorchBackend
    merged, cfg = small_merged_model("resnet50", 65)
    adapter_io.save(adapter_io.merged_state(merged, cfg), tmp_path / "merged.pt")
    graphs, eager = TorchBackend(tmp_path), TorchBackend(tmp_path, cuda_graphs=False)
    for batch, seed in ((1, 0), (1, 1), (3, 2), (3, 3)):
        g = np.random.default_rng(seed)
        feats = eager.encode(g.standard_normal((1, 2, 3, 65, 65)).astype(np.float32),
                             (g.random((1, 2, 65, 65)) > 0.5).astype(np.float32))
        q = g.standard_normal((batch, 3, 65, 65)).astype(np.float32)
        want = eager.decode(q, feats)
        got = graphs.decode(q, Backend.batch_features([feats] * batch))
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert len(graphs.graphs) == 2, "one graph per shape, reused"
