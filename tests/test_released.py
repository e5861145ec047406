"""Published checkpoints (PFENet, BAM) adopted without training: random weights written in the authors' layout
from the committed key manifests (tests/data/released/*.json, extracted from the authors' code by
tests/reference_manifest.py), read by `python -m stages.released`, served."""
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "tests" / "data" / "released"


def authors_checkpoint(manifest: str, path: Path) -> Path:
    """A file as the authors' train.py saves it ({'epoch', 'state_dict', 'optimizer'}, keys as in the manifest,
    `module.` included), random weights of the manifest's shapes (BatchNorm variances positive)."""
    man = json.loads((MANIFESTS / f"{manifest}.json").read_text())
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in man["keys"]:
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        else:
            fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            state[name] = torch.randn(shape, generator=g) * (1.0 / fan) ** 0.5
    for name in state:          # BAM's base learner: encoder = Sequential(layer0..4), the same tensors twice
        if name.startswith("module.encoder."):
            i, rest = name[len("module.encoder."):].split(".", 1)
            state[name] = state[f"module.layer{i}.{rest}"]
    torch.save({"epoch": 50, "state_dict": state, "optimizer": {}}, path)
    return path


@pytest.mark.parametrize("manifest,fmt,preset,shot", [
    ("pfenet_resnet50_pascal_1shot", "pfenet", "pascal_pfenet_frozen", 1),
    ("pfenet_vgg16_coco_1shot", "pfenet", "coco_pfenet_frozen_vgg", 1),
    ("bam_resnet50_pascal_5shot", "bam", "pascal_bam_frozen", 5),
    ("bam_vgg16_coco_1shot", "bam", "coco_bam_frozen_vgg", 1),
    ("svf_aspp_resnet50_pascal_1shot", "svf", "pascal_baseline_svf", 1),
    ("svf_pfenet_vgg16_pascal_1shot", "svf", "pascal_pfenet_svf_vgg", 1),
    ("svf_bam_resnet50_pascal_1shot", "svf", "pascal_bam_svf", 1),
    ("svf_bam_resnet50_pascal_1shot_plain", "svf", "pascal_bam_svf", 1)])
def test_every_key_of_the_authors_layout_lands_on_the_model(tmp_path, manifest, fmt, preset, shot):
    """The key map covers each layout both ways (nothing left over, nothing missing), the tensors land where the
    map says (a renamed PFENet key, BAM's shared backbone, its shifted pyramid index)."""
    from pipeline import released
    from pipeline.models import build_model
    from stages.released import preset_config
    from pipeline.data.benchmarks import fold_classes
    state, digest = released.read(authors_checkpoint(manifest, tmp_path / "f.pth"))
    assert not any(k.startswith("module.") for k in state) and len(digest) == 64
    cfg = preset_config(preset, fmt, 0)
    found = released.describe(state, fmt)
    released.check_fits(found, cfg, shot, preset)
    released.configure(cfg, fmt)
    base = {"classes": len(fold_classes(cfg, 0)[1]) + 1} if cfg.model.head == "bam" else None
    model, _ = build_model(cfg, base=base, shots=shot)
    released.load_into(model, state, fmt, cfg.model.head, preset)
    mine = model.state_dict()
    if fmt == "pfenet":
        assert torch.equal(mine["beta_conv.0.1.0.weight"], state["beta_conv.0.2.weight"])
        assert cfg.model.bins == ([60, 30, 15, 8] if "pascal" in preset else [1.0, 0.5, 0.25, 0.125])
    elif fmt == "bam":
        assert torch.equal(mine["base.backbone.layer1.0.weight" if "vgg" in manifest else "base.backbone.layer1.0.conv1.weight"],
                           mine["backbone.layer1.0.weight" if "vgg" in manifest else "backbone.layer1.0.conv1.weight"])
        assert torch.equal(mine["base.ppm.features.0.0.weight"], state["learner_base.0.features.0.1.weight"])
    elif found["factorised"]:         # the SVF authors' factors, folded: the conv they compute
        conv = next(k for k in state if k.startswith("layer2.") and k.endswith(".vector_S"))[:-len(".vector_S")]
        x = torch.randn(1, state[f"{conv}.conv_V.weight"].shape[1], 9, 9, dtype=torch.float64)
        theirs = torch.nn.functional.conv2d(x, state[f"{conv}.conv_V.weight"].double()) * \
            state[f"{conv}.vector_S"].double()
        theirs = torch.nn.functional.conv2d(theirs, state[f"{conv}.conv_U.weight"].double())
        dense = torch.nn.functional.conv2d(x, mine[f"backbone.{conv}.weight"].double())
        assert (dense - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    assert cfg.model.dilation == ("torchvision" if fmt == "svf" and cfg.model.head != "bam" else "pspnet")


def test_a_file_of_another_setting_is_named_with_the_preset_that_fits(tmp_path):
    from stages.released import main
    vgg = authors_checkpoint("bam_vgg16_pascal_1shot", tmp_path / "vgg.pth")
    five = authors_checkpoint("bam_resnet50_pascal_5shot", tmp_path / "five.pth")
    pfenet = authors_checkpoint("pfenet_vgg16_coco_1shot", tmp_path / "pfenet.pth")
    for args, msg in (([vgg, "--format", "bam", "--preset", "pascal_bam_frozen"], "backbone vgg16_bn .* use --preset "
                       "pascal_bam_frozen_vgg"),
                      ([vgg, "--format", "bam", "--preset", "coco_bam_frozen_vgg"], "benchmark pascal .* use --preset "
                       "pascal_bam_frozen_vgg"),
                      ([five, "--format", "bam", "--preset", "pascal_bam_frozen"], "shots 5 .* --shot 5"),
                      ([pfenet, "--format", "bam", "--preset", "coco_bam_frozen_vgg"], "a PFENET checkpoint .* --format pfenet .* coco_pfenet_frozen_vgg"),
                      ([pfenet, "--format", "pfenet", "--preset", "coco_bam_frozen_vgg"], "--format pfenet trains pfenet: choose such a preset"),
                      ([tmp_path / "none.pth", "--format", "pfenet", "--preset", "coco_pfenet_frozen_vgg"],
                       "does not exist")):
        with pytest.raises(SystemExit, match=msg):
            main([str(args[0]), *args[1:], "--fold", "0", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "merged.pt").exists()


def test_bams_released_base_learner_becomes_the_base_stages_checkpoint(tmp_path):
    """BAM's best.pth (its backbone twice, as layer* and encoder.*) -> base.pt that the base stage's reader takes for
    the preset and fold; the file of the other benchmark is refused, naming its classes."""
    from pipeline import adapter as adapter_io
    from stages.released import main, preset_config
    f = authors_checkpoint("bam_base_pspnet_vgg16_pascal", tmp_path / "best.pth")
    main([str(f), "--format", "bam", "--base", "--preset", "pascal_bam_frozen_vgg", "--fold", "1", "--out",
          str(tmp_path / "base.pt")])
    cfg = preset_config("pascal_bam_frozen_vgg", "bam", 1)
    cfg.model.pretrained = "none"
    base = adapter_io.read_base(tmp_path / "base.pt", cfg, 1)
    theirs = torch.load(f, weights_only=True)["state_dict"]
    assert torch.equal(base["state"]["ppm.features.2.0.weight"], theirs["module.ppm.features.2.1.weight"])
    assert torch.equal(base["state"]["backbone.layer3.0.weight"], theirs["module.encoder.3.0.weight"])
    with pytest.raises(SystemExit, match="the file has 16 classes"):
        main([str(f), "--format", "bam", "--base", "--preset", "coco_bam_frozen_vgg", "--fold", "1", "--out",
              str(tmp_path / "coco.pt")])


def test_a_released_bam_is_served(tmp_path):
    """BAM (VGG-16, PASCAL, 1 shot) in the authors' layout -> stages.released -> the service answers a query."""
    import httpx
    from pipeline.data.synthetic import generate_image
    from test_serving import Server
    f = authors_checkpoint("bam_vgg16_pascal_1shot", tmp_path / "train_epoch_50.pth")
    out = tmp_path / "model"
    p = subprocess.run([sys.executable, "-m", "stages.released", str(f), "--format", "bam", "--preset",
                        "pascal_bam_frozen_vgg", "--fold", "0", "--shot", "1", "--out", str(out), "--size", "97"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((out / "released.json").read_text())
    assert report["parity"]["max_rel"] < 1e-4 and report["sha256"] == __import__("hashlib").sha256(f.read_bytes()).hexdigest()
    s = Server(out, "onnxruntime")
    try:
        img, lab = generate_image(1, "val", 60, 7)
        m = (lab == lab.max()).astype(np.uint8)
        files = []
        for name, arr in (("query", img), ("supports", img), ("masks", m)):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "PNG")
            files.append((name, (f"{name}.png", buf.getvalue())))
        r = httpx.post(s.url + "/v1/segment", files=files, timeout=60)
        assert r.status_code == 200, r.text
        assert np.array(Image.open(io.BytesIO(r.content))).shape == (60, 60)
    finally:
        s.stop()


def test_dvc_repro_adopts_a_released_bam_on_the_pascal_miniature(tmp_path):
    """`make repro PRESET=pascal_bam_frozen_vgg RELEASED=...` on a miniature of PASCAL: the base stage takes the
    file's base learner, train its meta learner (no training), and evaluate, merge, export and report run unchanged,
    the report beside BAM's paper and the SVF paper's frozen row; MLflow names the file's sha256 as the run's
    source. A file of another setting stops the base stage with the preset that fits."""
    import hashlib

    import mlflow
    from stages.rehearse import prepare

    def place(proj, cfg):
        (proj / "initmodel/bam").mkdir(parents=True)
        authors_checkpoint("bam_vgg16_pascal_1shot", proj / "initmodel/bam/fold0_1shot.pth")
    proj, sh, cfg = prepare("pascal_bam_frozen_vgg", tmp_path / "proj",
                            "--released 'initmodel/bam/fold{fold}_{shot}shot.pth'", before=place)
    assert (cfg.train.released, cfg.model.pretrained, cfg.model.dilation) == \
        ("initmodel/bam/fold{fold}_{shot}shot.pth", "none", "pspnet")
    f = proj / "initmodel/bam/fold0_1shot.pth"
    small = ("-S 'split.folds=[0]' -S split.min_pixels=64 -S 'train.shots=[1]' -S 'eval.shots=[1]' "
             "-S 'export.shots=[1]' -S train.workers=0 -S data.workers=1 -S eval.episodes=2 -S 'eval.seeds=[510]' "
             "-S eval.test_size=64 -S eval.figure_episodes=1 -S export.parity_episodes=1")
    out = sh(f"dvc exp run {small}")
    assert "adopted the base learner of initmodel/bam/fold0_1shot.pth" in out and "not trained" in out
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    train = json.loads((proj / "models/fold0/1shot/train.json").read_text())
    assert train["released"]["sha256"] == digest and train["iterations"] == 0
    metrics = json.loads((proj / "metrics/fold0.json").read_text())
    assert metrics["paper"]["1shot"]["paper"] == 63.18                 # the SVF paper's BAM† row, VGG-16 fold 0
    assert metrics["released_paper"]["1shot"]["paper_mean"] == 64.41   # BAM's own
    assert "its paper 64.41" in out and metrics["parity"] >= 4
    # the adapter rebuilds the file's model exactly: the meta learner's weights are the file's
    state = torch.load(proj / "models/fold0/1shot/adapter.pt", weights_only=True)
    theirs = torch.load(f, weights_only=True)["state_dict"]
    assert torch.equal(state["head"]["aspp.branches.1.0.weight"], theirs["module.ASPP_meta.layer6_2.0.weight"])
    client = mlflow.MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    run = client.get_run(json.loads((proj / "models/fold0/1shot/mlflow_run.json").read_text())["run_id"])
    assert run.data.tags["released.sha256"] == digest and run.data.tags["source"] == "released"
    # a 5-shot file where a 1-shot one belongs: refused, naming what fits
    authors_checkpoint("bam_vgg16_pascal_5shot", proj / "initmodel/bam/five0_1.pth")
    out = sh(f"dvc exp run {small} -S \"train.released='initmodel/bam/five{{fold}}_{{shot}}.pth'\"", check=False)
    assert "shots 5 (the preset's: 1)" in out and "ERROR: failed to reproduce 'base@0'" in out, out[-3000:]


def test_validate_names_the_settings_and_files_a_released_model_needs(tmp_path):
    """`validate` (before DVC removes any output) refuses train.released when a file is missing or when params.yaml
    contradicts what the file's code fixes, naming each key and value; the preset command writes them right."""
    from stages.preset import render
    (tmp_path / "params.yaml").write_text(render("pascal_pfenet_frozen", released="initmodel/split{fold}.pth"))

    def validate():
        return subprocess.run([sys.executable, "-m", "stages.validate"], cwd=tmp_path, capture_output=True, text=True,
                              env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    r = validate()
    assert r.returncode != 0 and "no file initmodel/split0.pth, initmodel/split1.pth" in r.stderr, r.stderr
    (tmp_path / "initmodel").mkdir()
    for fold in range(4):
        (tmp_path / "initmodel" / f"split{fold}.pth").write_bytes(b"x")
    assert validate().returncode == 0 and (tmp_path / "data/params.ok").exists()
    text = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text.replace("dilation: pspnet", "dilation: torchvision")
                                          .replace("bins: [60, 30, 15, 8]", "bins: [1.0, 0.5, 0.25, 0.125]"))
    r = validate()
    assert r.returncode != 0 and not (tmp_path / "data/params.ok").exists()
    assert "model.dilation: 'pspnet'" in r.stderr and "model.bins: [60, 30, 15, 8]" in r.stderr, r.stderr
