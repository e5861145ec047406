"""The authors' own models against what `python -m stages.released` makes of their checkpoints.

Given a checkout of github.com/dvlab-research/PFENet (SVF_FSS_PFENET_REPO) and/or github.com/chunbolang/BAM
(SVF_FSS_BAM_REPO): the authors' model class, built from their files at random initialisation (with
non-trivial BatchNorm statistics and affine terms, and BAM's ensemble weights moved off [1, 0], so that every
path shows), is saved exactly as their train.py saves it ({'epoch', 'state_dict' of the wrapped model, keys
'module.'-prefixed, 'optimizer'}), adopted in-process by stages.released.adopt(), and the exported model.onnx
(ONNX Runtime, CPU) is compared with the authors' eval-mode forward on the same inputs (support masks 0/1 with
255 ignore pixels). Both output the logits at the input size ((S - 1) / 8 * zoom_factor 8 + 1 = S).

PFENet is one model for every shot count (its test.py sets ``shot``): one file per backbone, adopted once, run
with 1 and 5 shots. BAM's 5-shot model is another model (its k-shot reweighting): one file per case.
The published layouts: PFENet ResNet-50 on PASCAL (bins 60/30/15/8), VGG-16 on COCO (bins 1/0.5/0.25/0.125);
BAM both backbones on both benchmarks.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import cv2  # noqa: F401  (the real module, before reference_manifest.checkout stubs a missing one)
import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import rel_err
from stages.released import adopt
from reference_manifest import _bam_args, _fake_base_learner, checkout, cpu_cuda, quiet, scratch

PFENET = os.environ.get("SVF_FSS_PFENET_REPO", "")
BAM = os.environ.get("SVF_FSS_BAM_REPO", "")
TOL = 1e-4


# ------------------------------------------------------------------ shared steps
def _nontrivial_bn(model: nn.Module, seed: int) -> None:
    """Every BatchNorm of the authors' model with moved statistics and affine terms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                m.num_batches_tracked.fill_(1234)


@contextlib.contextmanager
def _one_process_group(workdir: Path):
    """A one-process gloo group for DistributedDataParallel on the CPU (BAM's multi-GPU train.py wraps in DDP)."""
    import torch.distributed as dist
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{workdir}/process_group", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _save_as_train_py(model: nn.Module, wrapper: str, optimizer: torch.optim.Optimizer, path: Path, workdir: Path):
    """torch.save({'epoch', 'state_dict': wrapped.state_dict(), 'optimizer'}) as their train.py does."""
    if wrapper == "DataParallel":                      # PFENet train.py: torch.nn.DataParallel(model.cuda())
        state = nn.DataParallel(model).state_dict()
    else:                                              # BAM train.py on its 4 GPUs (train.sh)
        with _one_process_group(workdir):
            state = nn.parallel.DistributedDataParallel(model).state_dict()
    assert state and all(k.startswith("module.") for k in state)
    torch.save({"epoch": 50, "state_dict": state, "optimizer": optimizer.state_dict()}, path)
    return path


def _inputs(b: int, k: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 3, size, size, generator=g)
    s = torch.randn(b, k, 3, size, size, generator=g)
    m = (torch.rand(b, k, size, size, generator=g) > 0.6).float()
    m[:, :, : size // 6] = 255                         # ignore pixels, as the authors' loaders write them
    m[:, :, size // 2:, : size // 5] = 255
    return q, s, m


def _adopt(path: Path, fmt: str, preset: str, shot: int, out: Path, size: int) -> dict:
    return adopt(str(path), fmt, preset, 0, shot, out, size)


def _onnx(out: Path, q, s, m) -> torch.Tensor:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(out / "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"])
    feed = {"query": q.numpy(), "support": s.numpy(), "support_mask": m.numpy()}
    (logits,) = sess.run(["logits"], feed)
    return torch.from_numpy(np.asarray(logits))


# ------------------------------------------------------------------ PFENet
# (backbone, the preset of the published setting, the ppm_scales of the authors' config, size)
PFENET_CASES = {
    "resnet50": ("pascal_pfenet_frozen", [60, 30, 15, 8], 97),           # config/pascal/pascal_split0_resnet50.yaml
    "vgg16": ("coco_pfenet_frozen_vgg", [1.0, 0.5, 0.25, 0.125], 129),   # config/coco/coco_split0_vgg.yaml
}
# VGG's layer3/4 run at stride 16: 129 px gives an 8x8 map and bins 8/4/2/1; at 97 px (6x6) the authors' code
# would pool to int(6 * 0.125) = 0 bins and fail.


@pytest.fixture(scope="module")
def pfenet_adopted(tmp_path_factory):
    """backbone -> (the authors' PFENet, the adopted model folder, adopt's report, seconds): built once."""
    cache = {}

    def get(backbone: str):
        if backbone not in cache:
            preset, scales, size = PFENET_CASES[backbone]
            work = tmp_path_factory.mktemp(f"pfenet_{backbone}")
            t0 = time.perf_counter()
            with checkout(Path(PFENET).resolve()), scratch(work):
                with cpu_cuda():
                    from model.PFENet import PFENet
                torch.manual_seed(0)
                with quiet():
                    ref = PFENet(layers=50, classes=2, zoom_factor=8, criterion=nn.CrossEntropyLoss(ignore_index=255),
                                 BatchNorm=nn.BatchNorm2d, pretrained=True, shot=1, ppm_scales=scales,
                                 vgg=backbone == "vgg16")
            _nontrivial_bn(ref, 1)
            trained = [p for n, p in ref.named_parameters() if not n.startswith(("layer0", "layer1", "layer2",
                                                                                 "layer3", "layer4"))]
            opt = torch.optim.SGD(trained, lr=0.0025, momentum=0.9, weight_decay=1e-4)
            ckpt = _save_as_train_py(ref, "DataParallel", opt, work / "train_epoch_50.pth", work)
            report = _adopt(ckpt, "pfenet", preset, 1, work / "model", size)
            cache[backbone] = (ref.eval(), work / "model", report, time.perf_counter() - t0)
        return cache[backbone]
    return get


@pytest.mark.skipif(not PFENET, reason="set SVF_FSS_PFENET_REPO to a checkout of github.com/dvlab-research/PFENet")
@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("backbone", list(PFENET_CASES))
def test_pfenet_released_onnx_matches_the_authors_forward(pfenet_adopted, backbone, shots):
    ref, out, report, build_s = pfenet_adopted(backbone)
    size = PFENET_CASES[backbone][2]
    t0 = time.perf_counter()
    b = 2 if shots == 1 else 1                         # a batch once; five supports at batch 1 (CPU time)
    q, s, m = _inputs(b, shots, size, seed=10 + shots)
    ref.shot = shots                                   # their test.py: PFENet(..., shot=args.shot), same weights
    with torch.no_grad():
        theirs = ref(q, s, m)
    _agree(f"pfenet {backbone} {PFENET_CASES[backbone][0]} {shots}-shot {size}px", theirs, _onnx(out, q, s, m),
           (b, 2, size, size), report, f"build+save+adopt {build_s:.1f} s, compare {time.perf_counter() - t0:.1f} s")


def _agree(case: str, theirs: torch.Tensor, mine: torch.Tensor, shape: tuple, report: dict, timing: str) -> None:
    """The authors' logits and the adopted ONNX model's: the same shape, equal to float32 rounding."""
    err = rel_err(mine, theirs)
    print(f"\n{case}: rel_err {err:.2e} (adopt's own ONNX parity {report['parity']['max_rel']:.1e}, exporter "
          f"{report['exporter']}; {timing})")
    assert theirs.shape == mine.shape == shape, (theirs.shape, mine.shape, shape)
    assert err < TOL, err


# ------------------------------------------------------------------ BAM
# (backbone, benchmark, preset, shots, size)
BAM_CASES = [("resnet50", "pascal", "pascal_bam_frozen", 1, 97),
             ("resnet50", "pascal", "pascal_bam_frozen", 5, 97),
             ("vgg16", "pascal", "pascal_bam_frozen_vgg", 1, 105),
             ("vgg16", "pascal", "pascal_bam_frozen_vgg", 5, 105),
             ("resnet50", "coco", "coco_bam_frozen", 1, 97),
             ("vgg16", "coco", "coco_bam_frozen_vgg", 1, 105)]


@pytest.mark.skipif(not BAM, reason="set SVF_FSS_BAM_REPO to a checkout of github.com/chunbolang/BAM")
@pytest.mark.parametrize("backbone,benchmark,preset,shots,size", BAM_CASES,
                         ids=[f"{b}-{d}-{k}shot" for b, d, _, k, _ in BAM_CASES])
def test_bam_released_onnx_matches_the_authors_forward(tmp_path, backbone, benchmark, preset, shots, size):
    t0 = time.perf_counter()
    args = _bam_args("vgg16_bn" if backbone == "vgg16" else "resnet50", benchmark, shots)
    with checkout(Path(BAM).resolve()), scratch(tmp_path):
        from model.BAM import OneModel
        torch.manual_seed(0)
        with quiet():
            _fake_base_learner(args, tmp_path)         # initmodel/PSPNet/.../best.pth, loaded strictly by BAM
            ref = OneModel(args, cls_type="Base")
        ref.freeze_modules(ref)
        args.base_lr, args.momentum, args.weight_decay = 0.005, 0.9, 1e-4
        opt = ref.get_optim(ref, args, LR=args.base_lr)
    _nontrivial_bn(ref, 2)
    with torch.no_grad():                              # the ensemble as if trained (init [1, 0] hides est, base map)
        ref.gram_merge.weight.copy_(torch.tensor([0.8, 0.6]).view(1, 2, 1, 1))
        ref.cls_merge.weight.copy_(torch.tensor([0.9, 0.7]).view(1, 2, 1, 1))
    ckpt = _save_as_train_py(ref, "DistributedDataParallel", opt, tmp_path / "train_epoch_50.pth", tmp_path)
    t1 = time.perf_counter()
    report = _adopt(ckpt, "bam", preset, shots, tmp_path / "model", size)
    t2 = time.perf_counter()
    ref.eval()
    b = 2 if shots == 1 else 1
    q, s, m = _inputs(b, shots, size, seed=20 + shots)
    with torch.no_grad():
        theirs, _meta, _base = ref(q, s, m, None, None)
    _agree(f"bam {backbone} {preset} {shots}-shot {size}px", theirs, _onnx(tmp_path / "model", q, s, m),
           (b, 2, size, size), report,
           f"build+save {t1 - t0:.1f} s, adopt {t2 - t1:.1f} s, compare {time.perf_counter() - t2:.1f} s")


# ------------------------------------------------------------------ BAM's test.py on the PASCAL miniature
@pytest.mark.skipif(not BAM, reason="set SVF_FSS_BAM_REPO to a checkout of github.com/chunbolang/BAM")
def test_the_protocol_scores_an_adopted_bam_as_bams_test_py(tmp_path):
    """The same episodes of the PASCAL miniature (fold 0, 1 shot, the project's draw) scored twice: by the project
    (EpisodeDataset protocol bam -> the adopted model -> pipeline.evaluate) and by BAM's test.py logic on the authors'
    model (cv2 reads, util/dataset.py's binary labels, util/transform.py Resize + ToTensor + Normalize as
    resized_val sets them, the forward, ori_resize, util/util.py intersectionAndUnionGPU, the per-class IoU
    averaged over the fold's 5 novel classes). The miniature's 64 px images grow to 96 (Resize, not test_Resize)."""
    from stages.rehearse import prepare
    from pipeline import released
    from pipeline.config import load_config
    from pipeline.data.benchmarks import fold_classes, prepared_dir, split_dir
    from pipeline.data.episodes import EpisodeDataset
    from pipeline.evaluate import evaluate
    from stages.released import preset_config
    proj, sh, _ = prepare("pascal_bam_frozen_vgg", tmp_path / "proj")
    sh("dvc exp run split -S split.min_pixels=64 -S 'split.folds=[0]' -S data.workers=1")
    cfg = load_config(proj / "params.yaml")
    prepared, val = prepared_dir(proj / "data", "pascal"), split_dir(proj / "data", "pascal", 0) / "val.jsonl"
    novel = fold_classes(cfg, 0)[0]
    size, episodes = 97, 12
    args = _bam_args("vgg16_bn", "pascal", 1)
    with checkout(Path(BAM).resolve()), scratch(tmp_path / "ref"):
        from model.BAM import OneModel
        T = _module_file(Path(BAM) / "util" / "transform.py", "bam_transform")
        iou = _function(Path(BAM) / "util" / "util.py", "intersectionAndUnionGPU")
        torch.manual_seed(0)
        with quiet():
            _fake_base_learner(args, tmp_path / "ref")
            ref = OneModel(args, cls_type="Base")
        ref.freeze_modules(ref)
        opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.005)
    _nontrivial_bn(ref, 3)
    with torch.no_grad():
        ref.gram_merge.weight.copy_(torch.tensor([0.8, 0.6]).view(1, 2, 1, 1))
        ref.cls_merge.weight.copy_(torch.tensor([0.9, 0.7]).view(1, 2, 1, 1))
    ref.eval()
    ds = EpisodeDataset(prepared, val, 1, "test", size, seed=510, episodes=episodes, protocol="bam")
    mean, std = [v * 255 for v in (0.485, 0.456, 0.406)], [v * 255 for v in (0.229, 0.224, 0.225)]
    tf = T.Compose([T.Resize(size=size), T.ToTensor(), T.Normalize(mean=mean, std=std)])

    def read(image_id: str, cls: int):                 # util/dataset.py SemData.__getitem__, mode val
        image = np.float32(cv2.cvtColor(cv2.imread(str(prepared / "images" / f"{image_id}.jpg"), cv2.IMREAD_COLOR),
                                        cv2.COLOR_BGR2RGB))
        label = cv2.imread(str(prepared / "labels" / f"{image_id}.png"), cv2.IMREAD_GRAYSCALE)
        binary = np.zeros_like(label)
        binary[label == cls] = 1
        binary[label == 255] = 255
        x, y = tf(image, binary.copy())
        return x, y, torch.from_numpy(binary)

    def forward(i: int):
        qid, cls, sids, _ = ds.episode(i)
        x, _, ori_label = read(qid, cls)
        sx, sy, _ = read(sids[0], cls)
        with torch.no_grad():
            return ref(x[None], sx[None, None], sy[None, None], None, None)[0], ori_label, cls

    # a random meta learner calls (nearly) every pixel one class: its foreground bias set so that about half is
    # foreground, and the two scorings have decisions to disagree on
    last = [m for m in ref.cls_meta.modules() if isinstance(m, nn.Conv2d)][-1]

    def foreground(bias: float) -> float:
        with torch.no_grad():
            last.bias[1] = last.bias[0] + bias
        return float(np.mean([forward(i)[0].argmax(1).float().mean().item() for i in range(3)]))
    lo, hi = -16.0, 16.0                             # foreground(lo) ~ 0, foreground(hi) ~ 1: bisect for a half
    for _ in range(40):
        bias = (lo + hi) / 2
        fg = foreground(bias)
        if 0.3 < fg < 0.7:
            break
        lo, hi = (bias, hi) if fg <= 0.3 else (lo, bias)
    assert 0.1 < fg < 0.9, fg
    ckpt = _save_as_train_py(ref, "DistributedDataParallel", opt, tmp_path / "train_epoch_50.pth", tmp_path)
    mine_cfg = released.released_params(preset_config("pascal_bam_frozen_vgg", "bam", 0), str(ckpt), "bam")
    model, _ = released.build(mine_cfg, "bam", ckpt, 0, 1, "pascal_bam_frozen_vgg")
    acc, _ = evaluate(model, ds, torch.device("cpu"), classes=novel, progress=False)

    inter, union, drawn = {c: 0.0 for c in novel}, {c: 0.0 for c in novel}, set()
    for i in range(len(ds)):
        output, ori_label, cls = forward(i)
        side = max(ori_label.shape)                    # test.py, ori_resize
        target = torch.full((1, side, side), 255.0)
        target[0, :ori_label.shape[0], :ori_label.shape[1]] = ori_label
        target = target.long()
        output = F_interpolate(output, target.shape[1:]).max(1)[1]
        i_, u_, _ = iou(output.float(), target.float(), 2, 255)   # histc: float on the CPU (CUDA takes long)
        inter[cls] += float(i_[1])
        union[cls] += float(u_[1])
        drawn.add(cls)
    theirs = 100 * sum(inter[c] / (union[c] + 1e-10) for c in novel) / len(novel)
    mine = 100 * acc.miou()
    print(f"\nPASCAL miniature, fold 0, 1 shot, {episodes} episodes of {len(drawn)} classes at {size} px, "
          f"foreground bias {bias}: the project {mine:.4f}, BAM's test.py logic {theirs:.4f}")
    assert len(drawn) >= 2 and mine > 1 and abs(mine - theirs) < 1e-3


def _module_file(path: Path, name: str):
    """A reference file as a module of its own (``checkout`` stubs the ``util`` package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _function(path: Path, name: str):
    """One function of a reference file, without the file's other imports (BAM's util.py imports seaborn, pandas)."""
    import ast
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = {"torch": torch, "np": np}
    exec(compile(ast.Module([node], type_ignores=[]), str(path), "exec"), scope)
    return scope[name]


def F_interpolate(x, size):
    return torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
