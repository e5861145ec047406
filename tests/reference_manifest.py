"""Manifests of the checkpoints the PFENet, BAM and SVF authors' training scripts write: for each published
layout, the names and shapes of the ``state_dict`` entry of the file their train.py saves, with no weights.

    .venv/bin/python tests/reference_manifest.py --pfenet DIR --bam DIR --svf DIR --out tests/data/released

DIR is a checkout of github.com/dvlab-research/PFENet, github.com/chunbolang/BAM and
github.com/zechao-li/SVF-few-shot-segmentation. Each model is the authors' own class, imported from that
checkout (nothing of theirs is copied here) and built at random initialisation on the CPU, the way their
train*.py builds it:

  * imports the forward pass never calls are stubbed as the parity tests do (cv2, BAM's ``util.util``, the
    SVF resnet.py's ``torchvision.models.utils``); PFENet's ``forward`` has CUDA tensors as default
    arguments, so ``Tensor.cuda`` returns its tensor while model/PFENet.py is imported;
  * their constructors load ``./initmodel/*.pth`` with ``strict=False``: they run in a scratch directory whose
    initmodel/ holds empty state dicts, and BAM's ``initmodel/PSPNet/<data_set>/split0/<backbone>/best.pth``
    (loaded strictly) is a randomly initialised base learner built by the same checkout's PSPNet class;
  * the saved names are those of the wrapped model: PFENet's train.py saves
    ``torch.nn.DataParallel(model.cuda()).state_dict()``; BAM's train.py / train_base.py and the SVF
    train_*.py wrap the model in ``DistributedDataParallel`` whenever more than one GPU is visible (their
    train.sh: torch.distributed.launch --nproc_per_node=4), after ``SyncBatchNorm.convert_sync_batchnorm``.
    Both wrappers add ``module.``; the wrapper is built here for real (DataParallel on the CPU, DDP on a
    one-process gloo group; SyncBatchNorm, which DDP refuses on the CPU, is checked separately to keep
    every name and shape of BatchNorm2d).

Every checkpoint their scripts write is ``{'epoch': ..., 'state_dict': <the names here>, 'optimizer': ...}``.
Each JSON: {"source", "format", "backbone", "benchmark", "shot", "keys": [[name, shape], ...]} (state_dict
order) plus "arch" (the authors' class), "wrapper" and "checkpoint" (the dict's top-level keys); the SVF
repo's also "svf" (its config switch). BAM's base learner (best.pth) has no shot count: "shot": null.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn as nn

CHECKPOINT = ["epoch", "state_dict", "optimizer"]
RESNET, VGG = "resnet50", "vgg16_bn"


# ------------------------------------------------------------------ importing a checkout's modules
def _purge() -> None:
    """Forget the previous checkout's ``model`` and ``util`` packages (all three repos use those names)."""
    for name in list(sys.modules):
        if name in ("model", "util") or name.startswith(("model.", "util.")):
            del sys.modules[name]


@contextlib.contextmanager
def checkout(repo: Path):
    """Import ``model.*`` from ``repo`` (cv2 and the data utilities stubbed: the model classes only import
    them; BAM's and SVF's model files import ``util.util.get_train_val_set``, used by test code only)."""
    _purge()
    sys.path.insert(0, str(repo))
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    util = types.ModuleType("util.util")
    util.get_train_val_set = None
    sys.modules["util"] = types.ModuleType("util")
    sys.modules["util.util"] = util
    # the SVF authors' model/module/resnet.py imports a torchvision module removed since (never called)
    sys.modules.setdefault("torchvision.models.utils",
                           types.SimpleNamespace(load_state_dict_from_url=torch.hub.load_state_dict_from_url))
    try:
        yield
    finally:
        sys.path.remove(str(repo))
        _purge()


@contextlib.contextmanager
def cpu_cuda():
    """``Tensor.cuda`` as the identity (PFENet's forward has ``torch.FloatTensor(...).cuda()`` defaults,
    evaluated when model/PFENet.py is imported)."""
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


@contextlib.contextmanager
def scratch(workdir: Path):
    """Run in ``workdir``, whose initmodel/ holds empty ImageNet files (their loaders use strict=False)."""
    (workdir / "initmodel").mkdir(parents=True, exist_ok=True)
    for name in ("resnet50_v2.pth", "resnet101_v2.pth", "vgg16_bn.pth", "vgg16.pth"):
        if not (workdir / "initmodel" / name).exists():
            torch.save({}, workdir / "initmodel" / name)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        yield
    finally:
        os.chdir(cwd)


def quiet():
    """The authors' constructors print their backbones; keep the script's output to its own lines."""
    return contextlib.redirect_stdout(io.StringIO())


def commit(repo: Path, given: str | None) -> str:
    if given:
        return given[:7]
    try:
        top, sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel", "--short=7", "HEAD"],
                                  capture_output=True, text=True, check=True).stdout.split()
    except (OSError, ValueError, subprocess.CalledProcessError):
        return "unknown"
    return sha if Path(top).resolve() == repo.resolve() else "unknown"   # not an enclosing repository's


# ------------------------------------------------------------------ the saved names
_PG: list = []


def _process_group(workdir: Path) -> None:
    import torch.distributed as dist
    if not _PG:
        dist.init_process_group("gloo", init_method=f"file://{workdir}/process_group", rank=0, world_size=1)
        _PG.append(True)


def saved_state(model: nn.Module, wrapper: str, workdir: Path) -> dict:
    """``wrapper(model).state_dict()`` as the authors' train script saves it."""
    if wrapper == "DataParallel":
        return nn.DataParallel(model).state_dict()
    assert wrapper == "DistributedDataParallel", wrapper
    # their order: convert_sync_batchnorm, then DDP. SyncBatchNorm keeps BatchNorm2d's names and shapes ...
    plain = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))   # converts the children in place
    assert {k: tuple(v.shape) for k, v in synced.state_dict().items()} == plain
    # ... but DDP takes it on GPUs only, so the CPU's DDP wraps the (name-identical) BatchNorm2d model
    _process_group(workdir)
    ddp = nn.parallel.DistributedDataParallel(model)
    state = ddp.state_dict()
    assert list(state) == ["module." + k for k in plain], "DDP added something besides module."
    return state


def manifest(state: dict, *, source: str, fmt: str, arch: str, backbone: str, benchmark: str, shot: int | None,
             wrapper: str) -> dict:
    return {"source": source, "format": fmt, "arch": arch, "backbone": backbone, "benchmark": benchmark,
            "shot": shot, "wrapper": wrapper, "checkpoint": CHECKPOINT,
            "keys": [[k, list(v.shape)] for k, v in state.items()]}


def write(out: Path, name: str, doc: dict) -> Path:
    """One JSON per layout, one state_dict entry a line."""
    lines = "{\n" + "".join(f" {json.dumps(k)}: {json.dumps(v)},\n" for k, v in doc.items() if k != "keys")
    lines += ' "keys": [\n'
    lines += ",\n".join("  " + json.dumps(kv) for kv in doc["keys"]) + "\n ]\n}\n"
    path = out / f"{name}.json"
    path.write_text(lines)
    json.loads(path.read_text())
    return path


# ------------------------------------------------------------------ the authors' models
def _bam_args(backbone: str, benchmark: str, shot: int, **extra) -> types.SimpleNamespace:
    """The Method/Train entries of BAM's config/<benchmark>/<benchmark>_split0_<net>.yaml the models read
    (the SVF repo's configs carry the same ones, plus ``svf``)."""
    return types.SimpleNamespace(layers=50, vgg=backbone == VGG, data_set=benchmark, split=0, shot=shot,
                                 zoom_factor=8, ignore_label=255, print_freq=10, low_fea="layer2",
                                 kshot_trans_dim=2, **extra)


def _fake_base_learner(args, workdir: Path, learner: nn.Module | None = None) -> None:
    """initmodel/PSPNet/<data_set>/split<k>/<vgg|resnet50>/best.pth: ``learner``'s state, or that of a base
    learner built by the checkout's own PSPNet class (model/PSPNet.py or model/module/PSPNet.py)."""
    net = "vgg" if args.vgg else f"resnet{args.layers}"
    path = workdir / f"initmodel/PSPNet/{args.data_set}/split{args.split}/{net}/best.pth"
    if path.exists():
        return
    if learner is None:
        try:
            from model.PSPNet import OneModel as PSPNet   # BAM's layout
        except ImportError:
            from model.module.PSPNet import OneModel as PSPNet   # the SVF authors'
        learner = PSPNet(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": learner.state_dict()}, path)


def pfenet_models(repo: Path, sha: str, workdir: Path):
    """dvlab-research/PFENet train.py: PFENet(layers, classes=2, zoom_factor=8, ..., pretrained=True,
    shot, ppm_scales, vgg) frozen backbone, then DataParallel(model.cuda())."""
    layouts = [("pfenet_resnet50_pascal_1shot", RESNET, "pascal", 1, [60, 30, 15, 8]),    # pascal_split0_resnet50.yaml
               ("pfenet_vgg16_coco_1shot", VGG, "coco", 1, [1.0, 0.5, 0.25, 0.125])]     # coco_split0_vgg.yaml
    with checkout(repo), scratch(workdir):
        with cpu_cuda():
            from model.PFENet import PFENet
        for name, backbone, benchmark, shot, scales in layouts:
            torch.manual_seed(0)
            with quiet():
                model = PFENet(layers=50, classes=2, zoom_factor=8, criterion=nn.CrossEntropyLoss(ignore_index=255),
                               BatchNorm=nn.BatchNorm2d, pretrained=True, shot=shot, ppm_scales=scales,
                               vgg=backbone == VGG)
            state = saved_state(model, "DataParallel", workdir)
            yield name, manifest(state, source=f"dvlab-research/PFENet@{sha}, model/PFENet.py (train.py)",
                                 fmt="pfenet", arch="PFENet", backbone=backbone, benchmark=benchmark, shot=shot,
                                 wrapper="DataParallel")


def bam_models(repo: Path, sha: str, workdir: Path):
    """chunbolang/BAM train.py (BAM.OneModel(args, cls_type='Base')) and train_base.py (PSPNet.OneModel(args),
    saved as the base learner's best.pth), each DDP-wrapped by their 4-GPU train*.sh."""
    with checkout(repo), scratch(workdir):
        from model.BAM import OneModel as BAM
        from model.PSPNet import OneModel as PSPNet
        for backbone in (RESNET, VGG):
            for benchmark in ("pascal", "coco"):
                torch.manual_seed(0)
                args = _bam_args(backbone, benchmark, 1)
                with quiet():
                    base = PSPNet(args)
                _fake_base_learner(args, workdir, base)   # what BAM.OneModel loads (strictly)
                state = saved_state(base, "DistributedDataParallel", workdir)
                tag = "vgg16" if backbone == VGG else "resnet50"
                yield f"bam_base_pspnet_{tag}_{benchmark}", manifest(
                    state, source=f"chunbolang/BAM@{sha}, model/PSPNet.py (train_base.py, best.pth)", fmt="bam",
                    arch="PSPNet", backbone=backbone, benchmark=benchmark, shot=None, wrapper="DistributedDataParallel")
                del base, state
                for shot in (1, 5):
                    args = _bam_args(backbone, benchmark, shot)
                    _fake_base_learner(args, workdir)
                    torch.manual_seed(0)
                    with quiet():
                        model = BAM(args, cls_type="Base")
                    model.freeze_modules(model)
                    state = saved_state(model, "DistributedDataParallel", workdir)
                    yield f"bam_{tag}_{benchmark}_{shot}shot", manifest(
                        state, source=f"chunbolang/BAM@{sha}, model/BAM.py (train.py)", fmt="bam", arch="BAM",
                        backbone=backbone, benchmark=benchmark, shot=shot, wrapper="DistributedDataParallel")
                    del model, state


def svf_models(repo: Path, sha: str, workdir: Path):
    """zechao-li/SVF-few-shot-segmentation train_aspp.py / train_pfenet.py / train_BAM.py:
    <arch>.OneModel(args, cls_type='Base'), then svf_modules (svf: True) or freeze_modules, SyncBN + DDP
    (train.sh: 4 GPUs). Their configs disagree on ``svf`` (PASCAL split0/1/2 ResNet-50 and split0 VGG say
    False, the rest True): both layouts are written, ``_plain`` for svf: False."""
    with checkout(repo), scratch(workdir):
        import model.aspp as aspp
        import model.BAM as bam
        import model.pfenet as pfenet
        for svf in (True, False):
            for backbone in (RESNET, VGG):
                for arch, module in (("aspp", aspp), ("pfenet", pfenet), ("BAM", bam)):
                    args = _bam_args(backbone, "pascal", 1, svf=svf)
                    if arch == "BAM":
                        with quiet():
                            _fake_base_learner(args, workdir)
                    torch.manual_seed(0)
                    with quiet():
                        model = module.OneModel(args, cls_type="Base")
                    if svf:
                        model.svf_modules(model)
                    else:
                        model.freeze_modules(model)
                    state = saved_state(model, "DistributedDataParallel", workdir)
                    tag = "vgg16" if backbone == VGG else "resnet50"
                    doc = manifest(state, source=f"zechao-li/SVF-few-shot-segmentation@{sha}, model/{arch}.py "
                                                 f"(train_{arch}.py, svf: {svf})", fmt="svf", arch=arch,
                                   backbone=backbone, benchmark="pascal", shot=1, wrapper="DistributedDataParallel")
                    doc["svf"] = svf
                    yield f"svf_{arch.lower()}_{tag}_pascal_1shot{'' if svf else '_plain'}", doc
                    del model, state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pfenet", type=Path, help="checkout of dvlab-research/PFENet")
    p.add_argument("--bam", type=Path, help="checkout of chunbolang/BAM")
    p.add_argument("--svf", type=Path, help="checkout of zechao-li/SVF-few-shot-segmentation")
    for name in ("pfenet", "bam", "svf"):
        p.add_argument(f"--{name}-commit", help=f"the --{name} checkout's commit, where it is not a git work tree")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "data" / "released")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.out = a.out.resolve()   # the builders run in a scratch directory
    a.out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="reference_manifest_") as tmp:
        for repo, given, build in ((a.pfenet, a.pfenet_commit, pfenet_models), (a.bam, a.bam_commit, bam_models),
                                   (a.svf, a.svf_commit, svf_models)):
            if repo is None:
                continue
            repo = repo.resolve()
            work = Path(tmp) / build.__name__
            work.mkdir()
            for name, doc in build(repo, commit(repo, given), work):
                path = write(a.out, name, doc)
                written.append(path)
                print(f"{path}  {len(doc['keys'])} keys  {path.stat().st_size // 1024} KiB", flush=True)
        if _PG:
            import torch.distributed as dist
            dist.destroy_process_group()
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
