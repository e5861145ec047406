import io
import os
import shutil
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import make_synthetic
from pipeline.data.miniature import COCO_CAT_IDS, PASCAL_LABELS, ArchiveServer, build_coco, build_pascal, md5
from pipeline.data import imagenet, sources
from pipeline.data.benchmarks import base_classes, novel_classes, prepared_dir, protocol_folds, split_dir
from pipeline.data.download import (ChecksumError, DiskSpaceError, DownloadError, Resource, UnsafeArchiveError,
                                     _check_tar, download, extract)
from pipeline.data.episodes import (MEAN, MEAN_255, STD, EpisodeDataset, TrainTransform, binarize, eval_image, eval_size,
                                    eval_transform, normalize, to_model)
from pipeline.data.prepare import PrepareError, prepare
from pipeline.data.split import fold_pairs, make_splits, read_pairs


# ------------------------------------------------------------------ protocol facts
def test_pascal_fold_classes():
    for i in range(4):
        assert novel_classes("pascal", i) == [5 * i + 1, 5 * i + 2, 5 * i + 3, 5 * i + 4, 5 * i + 5]
        assert sorted(base_classes("pascal", i) + novel_classes("pascal", i)) == list(range(1, 21))
        assert len(base_classes("pascal", i)) == 15


def test_coco_fold_classes():
    for i in range(4):
        novel = novel_classes("coco", i)
        assert novel == [i + 1 + 4 * k for k in range(20)] and novel[-1] == i + 77
        assert novel_classes("coco", i, "consecutive") == list(range(20 * i + 1, 20 * i + 21))
        assert len(base_classes("coco", i)) == 60
    assert novel_classes("coco", 0)[:3] == [1, 5, 9]


def test_unknown_benchmark_or_fold_lists_choices():
    with pytest.raises(ValueError, match=r"synthetic.*pascal.*coco"):
        novel_classes("ade20k", 0)
    with pytest.raises(ValueError, match=r"\[0, 1, 2, 3\]"):
        novel_classes("pascal", 4)
    with pytest.raises(ValueError, match="interleaved"):
        novel_classes("coco", 0, "random")
    from pipeline.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"data.benchmark.*synthetic"):
        load_config({"data": {"benchmark": "voc"}})
    with pytest.raises(ConfigError, match=r"split.folds.*\[0, 1, 2, 3\]"):
        load_config({"split": {"folds": [5]}})
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) train.lr_typo"):
        load_config({"train": {"lr_typo": 1}})


def test_pixel_rule_and_intersection_filter():
    pixels = {"a": {"1": 2048, "2": 2047}, "b": {"3": 5000, "6": 1}, "c": {"7": 3000}, "v": {"6": 2048, "8": 100}}
    novel, base = novel_classes("pascal", 1), base_classes("pascal", 1)   # novel 6..10
    train, val = fold_pairs(pixels, ["a", "b", "c"], ["v"], novel, base, 2048, "pfenet")
    assert train == [("a", 1), ("b", 3)] and val == [("v", 6)]
    train_bam, _ = fold_pairs(pixels, ["a", "b", "c"], ["v"], novel, base, 2048, "bam")
    assert train_bam == [("a", 1)]   # b holds one pixel of novel class 6, c is all novel (7)
    with pytest.raises(ValueError, match="bam"):
        fold_pairs(pixels, [], [], novel, base, 2048, "hsnet")


# ------------------------------------------------------------------ downloads
@pytest.fixture
def served(tmp_path):
    files = tmp_path / "srv"
    files.mkdir()
    (files / "blob.bin").write_bytes(bytes(range(256)) * 4096)   # 1 MiB
    with ArchiveServer(files) as srv:
        yield srv, files


def test_checksum_mismatch_removes_file_and_names_both(served, tmp_path):
    srv, files = served
    res = Resource(srv.url + "/blob.bin", "blob.bin", md5="0" * 32)
    with pytest.raises(ChecksumError) as e:
        download(res, tmp_path / "dl", progress=False)
    msg = str(e.value)
    actual = __import__("hashlib").md5((files / "blob.bin").read_bytes()).hexdigest()
    assert res.url in msg and "0" * 32 in msg and actual in msg
    assert not any((tmp_path / "dl").iterdir())


def test_interrupted_download_resumes(served, tmp_path):
    srv, files = served
    data = (files / "blob.bin").read_bytes()
    res = Resource(srv.url + "/blob.bin", "blob.bin", sha256=__import__("hashlib").sha256(data).hexdigest())
    srv.cut_after = 300_000
    with pytest.raises(DownloadError, match="resume|interrupted|early"):
        download(res, tmp_path / "dl", progress=False, timeout=5)
    part = tmp_path / "dl" / "blob.bin.part"
    assert part.exists() and 0 < part.stat().st_size < len(data)
    got = download(res, tmp_path / "dl", progress=False)
    assert got.read_bytes() == data and not part.exists()
    assert srv.requests[-1][1] == f"bytes={300_000}-"
    n = len(srv.requests)
    download(res, tmp_path / "dl", progress=False)   # verified file present: nothing fetched
    assert len(srv.requests) == n


def _evil_tar(path: Path, kind: str):
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("good/file.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        if kind == "dotdot":
            bad = tarfile.TarInfo("../escaped.txt")
            bad.size = 3
            tf.addfile(bad, io.BytesIO(b"bad"))
        elif kind == "absolute":
            bad = tarfile.TarInfo("/tmp/svf_fss_absolute.txt")
            bad.size = 3
            tf.addfile(bad, io.BytesIO(b"bad"))
        elif kind == "symlink":
            bad = tarfile.TarInfo("good/link")
            bad.type, bad.linkname = tarfile.SYMTYPE, "../../outside"
            tf.addfile(bad)
        elif kind == "chain":       # each link harmless on its own: q/r -> .. stays at the root, p -> q/r/../..
            for name, to in (("q/r", ".."), ("p", "q/r/../..")):   # lexically the root, really its parent
                link = tarfile.TarInfo(name)
                link.type, link.linkname = tarfile.SYMTYPE, to
                tf.addfile(link)
            bad = tarfile.TarInfo("p/escaped.txt")
            bad.size = 3
            tf.addfile(bad, io.BytesIO(b"bad"))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "chain"])
def test_unsafe_tar_members_refused_and_nothing_written(tmp_path, kind):
    arc = tmp_path / "evil.tar"
    _evil_tar(arc, kind)
    target = tmp_path / "out" / "target"
    with pytest.raises(UnsafeArchiveError):
        extract(arc, target)
    with tarfile.open(arc) as tf, pytest.raises(UnsafeArchiveError):
        _check_tar(tf, target.resolve())       # the check alone, without the standard library's filter
    assert not (tmp_path / "out" / "escaped.txt").exists()
    assert not Path("/tmp/svf_fss_absolute.txt").exists()
    assert not (target / "good").exists()     # checked before anything was written
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["target"]


def test_unsafe_zip_refused(tmp_path):
    arc = tmp_path / "evil.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("ok.txt", "ok")
        zf.writestr("../../escaped.txt", "bad")
    with pytest.raises(UnsafeArchiveError, match="outside"):
        extract(arc, tmp_path / "t")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "t" / "ok.txt").exists()


# ------------------------------------------------------------------ PASCAL end to end
@pytest.fixture
def pascal_raw(tmp_path):
    archives = tmp_path / "mirror"
    digests = build_pascal(archives)
    res = [(Resource("", r.filename, md5=digests[r.filename]), marker) for r, marker in sources.PASCAL]
    with ArchiveServer(archives) as srv:
        res = [(r.with_url(f"{srv.url}/{r.filename}"), m) for r, m in res]
        raw = sources.fetch_benchmark("pascal", tmp_path / "data", resources=res)
        assert {p for p, _ in srv.requests} == {"/VOCtrainval_11-May-2012.tar", "/benchmark.tgz", "/train_noval.txt"}
    return tmp_path / "data", raw


def test_pascal_download_prepare_split(pascal_raw):
    root, raw = pascal_raw
    assert (raw / "VOCdevkit/VOC2012/JPEGImages/2007_a.jpg").exists()
    out = prepared_dir(root, "pascal")
    counts = prepare("pascal", raw, out, workers=1)
    train = (out / "train.txt").read_text().split()
    val = (out / "val.txt").read_text().split()
    # VOC train + SBD train_noval with the duplicate removed, VOC val never in train
    assert train == ["2007_a", "2007_b", "2008_s1", "2008_s2"] and val == ["2009_v1", "2009_v2"]
    assert counts["train_images"] == 4 and counts["val_images"] == 2
    assert counts["classes"][6] == {"id": 7, "name": "car", "images": 1, "pixels": 64 * 40 - 40}
    lab_b = np.array(Image.open(out / "labels/2007_b.png"))
    assert lab_b.dtype == np.uint8 and set(np.unique(lab_b)) == {0, 7, 255}      # VOC png with its 255 band
    lab_s1 = np.array(Image.open(out / "labels/2008_s1.png"))                    # converted from SBD .mat
    assert np.array_equal(lab_s1, PASCAL_LABELS["2008_s1"])
    names = json.loads((out / "classes.json").read_text())["names"]
    assert names[0] == "aeroplane" and len(names) == 20
    pixels = json.loads((out / "class_pixels.json").read_text())
    assert pixels["2007_a"] == {"1": 2048, "2": 2047}
    assert pixels["2007_b"] == {"7": 64 * 40 - 40}      # the 255 row took 40 pixels of class 7

    summary = make_splits(out, split_dir(root, "pascal"), protocol_folds("pascal", range(4)), min_pixels=2048, rule="pfenet")
    f0_train = read_pairs(split_dir(root, "pascal", 0) / "train.jsonl")
    f0_val = read_pairs(split_dir(root, "pascal", 0) / "val.jsonl")
    assert f0_train == [("2007_b", 7), ("2008_s2", 12)]     # 2008_s1's class 6 covers 16 px only
    assert f0_val == [("2009_v1", 1), ("2009_v2", 2)]
    assert summary["fold0"]["train_pairs"] == 2
    # split.reference_lists: each fold's training images against the authors' data_list_<fold>.txt
    from pipeline.data.split import compare_with_reference
    ref = root / "lists"
    ref.mkdir()
    line = "/x/VOC2012/JPEGImages/{0}.jpg /x/VOC2012/SegmentationClassAug/{0}.png\n"
    (ref / "data_list_0.txt").write_text(line.format("2008_s2") + line.format("2007_b"))
    (ref / "data_list_1.txt").write_text(line.format("2007_a") + line.format("2009_v1"))
    got = compare_with_reference(split_dir(root, "pascal"), [0, 1], ref)
    assert got["0"]["same"] and got["0"]["both"] == 2
    assert not got["1"]["same"] and got["1"]["only_ours"] == ["2008_s1", "2008_s2"] and got["1"]["only_theirs"] == ["2009_v1"]
    assert json.loads((split_dir(root, "pascal") / "reference.json").read_text()) == got
    assert read_pairs(split_dir(root, "pascal", 1) / "train.jsonl") == [("2007_a", 1), ("2008_s1", 3), ("2008_s2", 12)]
    make_splits(out, split_dir(root, "pascal"), protocol_folds("pascal", [1]), min_pixels=2048, rule="bam")
    f1_train = read_pairs(split_dir(root, "pascal", 1) / "train.jsonl")
    # fold 1 novel 6..10: 2007_b (class 7) and 2008_s1 (16 pixels of class 6) are dropped by BAM's rule;
    # 2007_a keeps class 1 (2048 px) and loses class 2 (2047 px)
    assert f1_train == [("2007_a", 1), ("2008_s2", 12)]


def test_a_verified_download_is_never_fetched_again_and_archives_can_go(tmp_path):
    """What DVC reruns (an edit of sources.py, a new checksum elsewhere) costs no second download: verified.json
    records each file's checksum and extraction; data.keep_archives: false deletes each archive once extracted,
    and the next run still fetches nothing. A file whose checksum the code changes is fetched again."""
    archives = tmp_path / "mirror"
    digests = build_pascal(archives)
    with ArchiveServer(archives) as srv:
        res = [(Resource(f"{srv.url}/{r.filename}", r.filename, md5=digests[r.filename]), m) for r, m in sources.PASCAL]
        raw = sources.fetch_benchmark("pascal", tmp_path / "data", resources=res, keep_archives=False)
        assert len(srv.requests) == 3 and sorted(p.name for p in (raw / "archives").iterdir()) == ["train_noval.txt"]
        record = json.loads((raw / "verified.json").read_text())
        assert record["benchmark.tgz"]["digest"] == f"md5:{digests['benchmark.tgz']}"
        assert record["benchmark.tgz"]["extracted"] == "benchmark_RELEASE/dataset/cls"
        image = raw / "VOCdevkit/VOC2012/JPEGImages/2007_a.jpg"
        inode = image.stat().st_ino
        sources.fetch_benchmark("pascal", tmp_path / "data", resources=res, keep_archives=False)
        assert len(srv.requests) == 3 and image.stat().st_ino == inode      # nothing fetched, nothing rewritten
        (archives / "train_noval.txt").write_text("2007_b\n2008_s1\n")     # the code now asks for another file
        changed = [(r, m) if r.filename != "train_noval.txt" else
                   (Resource(r.url, r.filename, md5=md5(archives / "train_noval.txt")), m) for r, m in res]
        sources.fetch_benchmark("pascal", tmp_path / "data", resources=changed, keep_archives=False)
        assert [p for p, _ in srv.requests[3:]] == ["/train_noval.txt"]
        assert (raw / "train_noval.txt").read_text() == "2007_b\n2008_s1\n"


def test_data_already_on_disk_is_adopted_checked_and_never_deleted(tmp_path):
    """data.local: an extracted VOC + SBD tree is checked against its own lists and linked, archives are taken by
    checksum, nothing is downloaded (the URLs point at a closed port), and prepare reads the adopted tree; a VOC
    tree with SegmentationClassAug needs no SBD, and a label missing from it is named; a missing image is named; a local archive failing its checksum is named and left untouched; an archive in
    data/raw/<benchmark>/archives failing its checksum is moved aside, not deleted."""
    import tarfile
    archives = tmp_path / "mirror"
    digests = build_pascal(archives)
    dead = [(Resource(f"http://127.0.0.1:9/{r.filename}", r.filename, md5=digests[r.filename]), m)
            for r, m in sources.PASCAL]
    tree = tmp_path / "VOC"                      # what a user extracted long ago, and SBD's plain list beside it
    for name in ("VOCtrainval_11-May-2012.tar", "benchmark.tgz"):
        with tarfile.open(archives / name) as tf:
            tf.extractall(tree, filter="data")
    shutil.copy(archives / "train_noval.txt", tree)
    raw = sources.fetch_benchmark("pascal", tmp_path / "data", resources=dead, local=tree)
    assert (raw / "VOCdevkit").is_symlink() and (raw / "VOCdevkit/VOC2012/JPEGImages/2007_a.jpg").exists()
    record = json.loads((raw / "verified.json").read_text())
    assert record["VOCtrainval_11-May-2012.tar"]["adopted"] == str((tree / "VOCdevkit").resolve())
    assert record["VOCtrainval_11-May-2012.tar"]["checked"] == {"images": 4, "labels": 4}
    assert prepare("pascal", raw, prepared_dir(tmp_path / "data", "pascal"), workers=1)["train_images"] == 4
    assert sources.fetch_benchmark("pascal", tmp_path / "data", resources=dead, local=tree) == raw   # kept

    aug = tmp_path / "AUG"                        # VOC with PFENet's SegmentationClassAug: no SBD archive is needed
    shutil.copytree(tree / "VOCdevkit", aug / "VOCdevkit", ignore=shutil.ignore_patterns("SegmentationClass"))
    shutil.copy(tree / "train_noval.txt", aug)
    (aug / "VOCdevkit/VOC2012/SegmentationClassAug").mkdir()
    for i in ("2007_a", "2007_b", "2008_s1", "2008_s2", "2009_v1", "2009_v2"):
        Image.fromarray(PASCAL_LABELS[i]).save(aug / f"VOCdevkit/VOC2012/SegmentationClassAug/{i}.png")
    raw = sources.fetch_benchmark("pascal", tmp_path / "d6", resources=dead, local=aug)
    assert "benchmark.tgz" not in json.loads((raw / "verified.json").read_text())
    out = prepared_dir(tmp_path / "d6", "pascal")
    assert prepare("pascal", raw, out, workers=1)["train_images"] == 4
    assert np.array_equal(np.array(Image.open(out / "labels/2007_b.png")), PASCAL_LABELS["2007_b"])   # Aug's, no band
    (aug / "VOCdevkit/VOC2012/SegmentationClassAug/2008_s2.png").unlink()
    with pytest.raises(PrepareError, match=r"1 of the 6 labels .* missing from .*SegmentationClassAug, e.g. 2008_s2"):
        prepare("pascal", raw, prepared_dir(tmp_path / "d7", "pascal"), workers=1)
    with pytest.raises(FileNotFoundError, match=r"1 of the 6 SegmentationClassAug labels the lists name are missing"):
        sources.fetch_benchmark("pascal", tmp_path / "d8", resources=dead, local=aug)
    # a list naming a file outside its folder (lists in a user's tree carry no checksum): refused, nothing written
    (aug / "train_noval.txt").write_text("2008_s1\n../../../escape\n")
    with pytest.raises(ValueError, match=r"train_noval.txt: 1 id\(s\) that are not plain file names, e.g. '../../../escape'"):
        sources.fetch_benchmark("pascal", tmp_path / "d9", resources=dead, local=aug)
    (raw / "train_noval.txt").write_text("2008_s1\n..\\..\\escape\n")
    with pytest.raises(PrepareError, match="not plain file names"):
        prepare("pascal", raw, prepared_dir(tmp_path / "d7", "pascal"), workers=1)
    assert not list(tmp_path.rglob("escape*"))

    (tree / "VOCdevkit/VOC2012/JPEGImages/2009_v2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 4 VOC images the lists name are missing .*2009_v2.jpg"):
        sources.fetch_benchmark("pascal", tmp_path / "d2", resources=dead, local=tree)

    packed = tmp_path / "archives"                # the archives themselves, one of them damaged
    shutil.copytree(archives, packed)
    raw = sources.fetch_benchmark("pascal", tmp_path / "d3", resources=dead, local=packed)
    assert (raw / "VOCdevkit/VOC2012/JPEGImages/2009_v2.jpg").exists() and not (raw / "archives").exists()
    (packed / "benchmark.tgz").write_bytes(b"damaged")
    with pytest.raises(sources.ChecksumError, match="benchmark.tgz fails its checksum .* left untouched"):
        sources.fetch_benchmark("pascal", tmp_path / "d4", resources=dead, local=packed)
    assert (packed / "benchmark.tgz").read_bytes() == b"damaged"

    placed = tmp_path / "d5/raw/pascal/archives"  # the documented place for archives: a bad one is moved aside
    placed.mkdir(parents=True)
    (placed / "benchmark.tgz").write_bytes(b"damaged")
    with ArchiveServer(archives) as srv:
        res = [(r.with_url(f"{srv.url}/{r.filename}"), m) for r, m in dead]
        sources.fetch_benchmark("pascal", tmp_path / "d5", resources=res)
    aside = list(placed.glob("benchmark.tgz.mismatch-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b"damaged" and md5(placed / "benchmark.tgz") == digests["benchmark.tgz"]


SVF_REPO = os.environ.get("SVF_FSS_SVF_REPO", "")


@pytest.mark.skipif(not SVF_REPO, reason="set SVF_FSS_SVF_REPO to a checkout of github.com/zechao-li/"
                    "SVF-few-shot-segmentation (its lists/pascal)")
def test_the_pascal_folds_equal_the_svf_authors_lists_on_the_miniatures_ids(tmp_path):
    """A miniature on real VOC ids, up to three of each pattern of fold membership the authors' lists show: each
    image gets, as SegmentationClassAug labels, a 2048-pixel block (64 x 32) of every class their per-class lists
    say it holds at 2048 pixels or more, and a 2047-pixel block of a novel class where an image with only base
    classes is still missing from a fold's list (BAM's filter drops it at any size). Adopted through data.local
    (no SBD archive), prepared and split by the project: every fold's training images and (image, class) pairs, and
    its val pairs, equal the authors' data_list_<fold>.txt and sub_class_file_list_<fold>.txt on those ids."""
    import ast
    lists = Path(SVF_REPO) / "lists" / "pascal"

    def ids(path):
        return [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]

    def per_class(path):
        return {c: {Path(img).stem for img, _ in v} for c, v in ast.literal_eval(path.read_text()).items()}
    theirs = {part: ({f: set(ids(lists / "fss_list" / part / f"data_list_{f}.txt")) for f in range(4)},
                     {f: per_class(lists / "fss_list" / part / f"sub_class_file_list_{f}.txt") for f in range(4)})
              for part in ("train", "val")}
    voc_train, sbd, voc_val = ids(lists / "voc_original_train.txt"), ids(lists / "sbd_data.txt"), ids(lists / "val.txt")

    def sample(pool, member, per=3):
        seen, out = {}, []
        for i in pool:
            key = tuple(i in member[f] for f in range(4))
            if seen.get(key, 0) < per:
                seen[key] = seen.get(key, 0) + 1
                out.append(i)
        return out
    train = sample(ids(lists / "voc_sbd_merge_noduplicate.txt"), theirs["train"][0])
    val = sample(voc_val, theirs["val"][0])
    assert len(train) > 30 and len(val) > 10, (len(train), len(val))

    tree = tmp_path / "local"
    voc = tree / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    for part, sample_ids in (("train", train), ("val", val)):
        member, classes = theirs[part]
        for i in sample_ids:
            big = sorted({c for f in range(4) if i in member[f] for c, imgs in classes[f].items() if i in imgs})
            small = []
            for f in range(4):
                novel = novel_classes("pascal", f)
                if part == "train" and i not in member[f] and big and set(big) <= set(base_classes("pascal", f)):
                    small.append(novel[0])
            blocks = [(c, 2048) for c in big] + [(c, 2047) for c in small]
            label = np.zeros((32 * max(len(blocks), 1), 64), np.uint8)
            for k, (c, n) in enumerate(blocks):
                label[32 * k:32 * (k + 1)].flat[:n] = c
            Image.fromarray(label, mode="L").save(voc / "SegmentationClassAug" / f"{i}.png")
            Image.fromarray(np.full(label.shape + (3,), 128, np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
    (voc / "ImageSets/Segmentation/train.txt").write_text("".join(f"{i}\n" for i in train if i in set(voc_train)))
    (voc / "ImageSets/Segmentation/val.txt").write_text("".join(f"{i}\n" for i in val))
    (tree / "train_noval.txt").write_text("".join(f"{i}\n" for i in train if i in set(sbd)))
    noval = Resource("http://127.0.0.1:9/train_noval.txt", "train_noval.txt", md5=md5(tree / "train_noval.txt"))
    resources = [(r, m) for r, m in sources.PASCAL if m] + [(noval, None)]    # nothing reachable: all adopted
    raw = sources.fetch_benchmark("pascal", tmp_path / "data", resources=resources, local=tree)
    assert "benchmark.tgz" not in json.loads((raw / "verified.json").read_text())
    out = prepared_dir(tmp_path / "data", "pascal")
    prepare("pascal", raw, out, workers=1)
    assert sorted((out / "train.txt").read_text().split()) == sorted(train)
    make_splits(out, split_dir(tmp_path / "data", "pascal"), protocol_folds("pascal", range(4)), 2048, "bam")

    from pipeline.data.split import compare_with_reference
    ref = tmp_path / "lists"                     # their lines, restricted to the miniature's ids
    ref.mkdir()
    for f in range(4):
        lines = (lists / "fss_list/train" / f"data_list_{f}.txt").read_text().splitlines()
        (ref / f"data_list_{f}.txt").write_text("".join(f"{x}\n" for x in lines if Path(x.split()[0]).stem in train))
    report = compare_with_reference(split_dir(tmp_path / "data", "pascal"), range(4), ref)
    assert all(report[str(f)]["same"] for f in range(4)), report
    for part, sample_ids in (("train", train), ("val", val)):
        member, classes = theirs[part]
        for f in range(4):
            ours = set(read_pairs(split_dir(tmp_path / "data", "pascal", f) / f"{part}.jsonl"))
            want = {(i, c) for c, imgs in classes[f].items() for i in imgs if i in sample_ids}
            assert ours == want, (part, f, sorted(ours ^ want)[:5])
            assert {i for i, _ in ours} == member[f] & set(sample_ids)


def test_too_little_disk_is_named_before_anything_is_written(tmp_path):
    """The check before the first byte, against the disk's real free space: the shortfall is named."""
    import shutil
    free = shutil.disk_usage(tmp_path).free
    huge = Resource("http://127.0.0.1:9/never.zip", "never.zip", md5="0" * 32, size=free)   # twice with its extraction
    with pytest.raises(DiskSpaceError) as e:
        sources.fetch_benchmark("coco", tmp_path / "data", resources=[(huge, "never")])
    msg = str(e.value)
    assert "needs" in msg and "free" in msg and "data.keep_archives: false" in msg and str(tmp_path / "data") in msg
    assert not (tmp_path / "data/raw/coco/archives").exists()
    # a small disk for real (a 64 KiB tmpfs; root only, elsewhere this part is left out): the server's
    # Content-Length is checked before the first byte, and a verified file already there is kept
    import subprocess
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        return
    try:
        files = tmp_path / "srv"
        files.mkdir()
        (files / "big.bin").write_bytes(np.random.default_rng(0).bytes(200_000))
        (files / "tiny.txt").write_text("kept")
        import hashlib
        with ArchiveServer(files) as srv:
            tiny = Resource(f"{srv.url}/tiny.txt", "tiny.txt", md5=hashlib.md5(b"kept").hexdigest())
            download(tiny, small / "dl", progress=False)
            big = Resource(f"{srv.url}/big.bin", "big.bin", md5=hashlib.md5((files / "big.bin").read_bytes()).hexdigest())
            with pytest.raises(DiskSpaceError, match=r"big.bin needs 0.2 MB in .*small/dl, the disk has .* free: free"):
                download(big, small / "dl", progress=False)
        assert sorted(p.name for p in (small / "dl").iterdir()) == ["tiny.txt"]
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


def test_a_damaged_archive_is_named_and_nothing_is_extracted(tmp_path):
    good = tmp_path / "a.tgz"
    with tarfile.open(good, "w:gz") as tf:
        for i in range(20):
            data = np.random.default_rng(i).integers(0, 255, 5000, dtype=np.uint8).tobytes()
            info = tarfile.TarInfo(f"top/f{i}.bin")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DownloadError, match="cut.tgz is damaged.*delete it"):
        extract(cut, tmp_path / "out", "top")
    assert not (tmp_path / "out" / "top").exists() and not list(tmp_path.glob(".out.extracting"))


def test_corrupt_image_and_label_are_named(pascal_raw):
    root, raw = pascal_raw
    bad = raw / "VOCdevkit/VOC2012/JPEGImages/2007_b.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(PrepareError, match="2007_b.jpg"):
        prepare("pascal", raw, prepared_dir(root, "pascal"), workers=1)
    assert not prepared_dir(root, "pascal").exists()
    bad.write_bytes(Path(raw / "VOCdevkit/VOC2012/JPEGImages/2007_a.jpg").read_bytes())
    (raw / "benchmark_RELEASE/dataset/cls/2008_s2.mat").write_bytes(b"garbage")
    with pytest.raises(PrepareError, match="2008_s2.mat"):
        prepare("pascal", raw, prepared_dir(root, "pascal"), workers=1)


def test_polygons_rasterised_in_their_box_are_pycocotools_whole_image_masks():
    """prepare paints a COCO polygon from its bounding box only; the pixels must be pycocotools' own on the whole
    image, for polygons inside, across and beyond the edges, with integer, 2-decimal (tie-prone) and real coordinates."""
    from pycocotools import mask as mask_utils

    from pipeline.data.prepare import _polygon_mask
    rng = np.random.default_rng(0)
    for trial in range(3000):
        h, w = int(rng.integers(5, 120)), int(rng.integers(5, 120))
        polys = []
        for _ in range(int(rng.integers(1, 3))):
            k = int(rng.integers(3, 12))
            xs, ys = rng.uniform(-10, w + 10, k), rng.uniform(-10, h + 10, k)
            if trial % 3 == 0:
                xs, ys = np.round(xs), np.round(ys)
            elif trial % 2 == 0:        # COCO's: two decimals, on the ties of pycocotools' x5 rounding
                xs, ys = np.round(xs, 2), np.round(ys, 1)
            if trial % 5 == 0:
                xs, ys = rng.uniform(0.3 * w, 0.6 * w, k), rng.uniform(0.3 * h, 0.6 * h, k)
            if trial % 7 == 0:
                xs = rng.uniform(w + 1, w + 20, k)
            polys.append(np.stack([xs, ys], 1).ravel())
        whole = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w)))
        y0, x0, box = _polygon_mask(polys, h, w)
        mine = np.zeros((h, w), np.uint8)
        mine[y0:y0 + box.shape[0], x0:x0 + box.shape[1]] = box
        assert (mine == whole).all(), (trial, h, w, polys)


def test_a_killed_prepare_continues_where_it_stopped(tmp_path, caplog):
    """SIGKILL mid-way (the process group: parent and workers); the rerun finishes the rest and its output is
    the uninterrupted run's, byte for byte."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from pipeline.config import SyntheticCfg
    raw = sources.fetch_benchmark("synthetic", tmp_path, synthetic=SyntheticCfg(num_train=500, num_val=100,
                                                                                image_size=64, seed=3), workers=2)
    whole = prepare("synthetic", raw, tmp_path / "whole", workers=1)
    out = tmp_path / "prepared" / "synthetic"
    code = f"from pipeline.data.prepare import prepare; prepare('synthetic', {str(raw)!r}, {str(out)!r}, workers=1)"
    p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stderr=subprocess.DEVNULL,
                         cwd=Path(__file__).resolve().parents[1])
    journal = out.parent / ".synthetic.tmp" / "done.jsonl"
    t0 = time.time()
    while not (journal.exists() and journal.read_text().count("\n") >= 100) and time.time() - t0 < 60:
        time.sleep(0.005)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not out.exists()
    finished = journal.read_text().count("\n")
    assert 100 <= finished < 600, finished
    caplog.set_level("INFO")
    again = prepare("synthetic", raw, out, workers=1)
    assert f"{finished} of 600 images done by an earlier run" in caplog.text
    assert again == whole
    for f in ("class_pixels.json", "class_report.json", "train.txt", "val.txt"):
        assert (out / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f
    labels = sorted((out / "labels").iterdir())
    assert len(labels) == 600 and all(f.read_bytes() == (tmp_path / "whole/labels" / f.name).read_bytes() for f in labels)


def test_missing_raw_names_the_stage(tmp_path):
    with pytest.raises(PrepareError, match="dvc repro download"):
        prepare("pascal", tmp_path / "nothing", tmp_path / "out")


# ------------------------------------------------------------------ COCO end to end
def test_coco_download_prepare_split(tmp_path):
    archives = tmp_path / "mirror"
    digests = build_coco(archives)
    with ArchiveServer(archives) as srv:
        res = [(Resource(f"{srv.url}/{r.filename}", r.filename, md5=digests[r.filename]), m) for r, m in sources.COCO]
        raw = sources.fetch_benchmark("coco", tmp_path / "data", resources=res)
    out = prepared_dir(tmp_path / "data", "coco")
    counts = prepare("coco", raw, out, workers=1)
    assert (out / "train.txt").read_text().split() == ["COCO_train2014_000000000001", "COCO_train2014_000000000002"]
    report = json.loads((out / "class_report.json").read_text())
    assert counts["skipped_annotations"] == 2
    assert [(a["id"], a["image"]) for a in report[11]["skipped_annotations"]] == [(6, "COCO_train2014_000000000002")]
    assert "no polygon of 3 or more points ([2] points)" in report[11]["skipped_annotations"][0]["why"]
    assert [a["id"] for a in report[79]["skipped_annotations"]] == [7]
    l1 = np.array(Image.open(out / "labels/COCO_train2014_000000000001.png"))
    assert l1.shape == (48, 64)
    assert set(np.unique(l1)) == {0, 1, 80}            # category 90 -> 80, category 1 -> 1
    assert (l1[24:, 32:] == 1).all() and (l1[:47, :31] == 80).all()
    l2 = np.array(Image.open(out / "labels/COCO_train2014_000000000002.png"))
    assert set(np.unique(l2)) == {0, COCO_CAT_IDS.index(13) + 1}   # the crowd region stays background
    assert COCO_CAT_IDS.index(13) + 1 == 12
    names = json.loads((out / "classes.json").read_text())["names"]
    assert len(names) == 80 and names[79] == "cat90"
    make_splits(out, split_dir(tmp_path / "data", "coco"), protocol_folds("coco", [0, 3]), 100, "pfenet")
    # fold 0 novel = {1, 5, ..., 77}: class 1 is novel, 80 (fold 3) base; class 2 of val is base in fold 0
    assert read_pairs(split_dir(tmp_path / "data", "coco", 0) / "train.jsonl") == [
        ("COCO_train2014_000000000001", 80), ("COCO_train2014_000000000002", 12)]
    assert read_pairs(split_dir(tmp_path / "data", "coco", 0) / "val.jsonl") == []
    assert read_pairs(split_dir(tmp_path / "data", "coco", 3) / "train.jsonl") == [
        ("COCO_train2014_000000000001", 1)]


def test_weights_download_verifies_the_full_sha256(tmp_path):
    srv_dir = tmp_path / "srv"
    srv_dir.mkdir()
    state = {"conv1.weight": torch.zeros(1)}
    buf = io.BytesIO()
    torch.save(state, buf)
    import hashlib
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    name = f"resnet18-{digest[:8]}.pth"
    (srv_dir / name).write_bytes(buf.getvalue())
    # a different file with the same 8-digit prefix: what a prefix check would let through
    other = digest[:8] + ("0" if digest[8] != "0" else "1") + digest[9:]
    with ArchiveServer(srv_dir) as srv:
        got = imagenet.fetch_weights(["resnet18"], tmp_path / "data",
                                    resources={"resnet18": Resource(f"{srv.url}/{name}", name, sha256=digest)})
        assert Path(got["resnet18"]["file"]).read_bytes() == buf.getvalue()
        assert got["resnet18"]["sha256"] == digest
        with pytest.raises(ChecksumError, match=name):
            imagenet.fetch_weights(["resnet18"], tmp_path / "d2",
                                  resources={"resnet18": Resource(f"{srv.url}/{name}", name, sha256=other)})
        assert not list((tmp_path / "d2").rglob(name)), "a file that failed verification is removed"
    for bad in ({"sha256": digest[:8]}, {"sha256": digest.upper()}, {"md5": "0" * 31}, {}):
        with pytest.raises(ValueError, match="full digest|md5 or sha256"):
            Resource("http://127.0.0.1/x", "x", **bad)


def test_imagenet_checkpoints_are_known_by_their_full_sha256():
    import torchvision

    from pipeline.models.backbone import WEIGHT_ENUMS
    assert set(imagenet.IMAGENET_SHA256) == set(WEIGHT_ENUMS)
    for arch in WEIGHT_ENUMS:
        res = imagenet.backbone_resource(arch)
        # the installed torchvision's file name carries the first 8 digits of the same digest
        assert res.url == getattr(torchvision.models, WEIGHT_ENUMS[arch]).IMAGENET1K_V1.url
        assert len(res.sha256) == 64 and res.filename == f"{arch}-{res.sha256[:8]}.pth"
    assert imagenet.backbone_resource("resnet50").sha256.startswith("0676ba61b679")
    with pytest.raises(ValueError, match="no torchvision ImageNet checkpoint"):
        imagenet.backbone_resource("resnet50_deep")


def test_imagenet_backbone_without_its_verified_file_names_the_download_stage(tmp_path):
    from pipeline.models import load_backbone
    with pytest.raises(FileNotFoundError, match="dvc repro weights.*full sha256"):
        load_backbone("resnet18", "imagenet", weights_root=tmp_path)


# ------------------------------------------------------------------ synthetic + episodes
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn"), 60, 30, seed=3)


def test_synthetic_is_deterministic_and_valid(synthetic, tmp_path):
    from pipeline.data.synthetic import generate_image
    a_img, a_lab = generate_image(5, "train", 64, 3)
    b_img, b_lab = generate_image(5, "train", 64, 3)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(generate_image(5, "train", 64, 4)[1], a_lab)
    lab = np.array(Image.open(prepared_dir(synthetic, "synthetic") / "labels/train_00005.png"))
    assert np.array_equal(lab, a_lab)
    assert set(np.unique(lab)) <= set(range(21)) | {255} and (lab == 255).any()
    pixels = json.loads((prepared_dir(synthetic, "synthetic") / "class_pixels.json").read_text())
    present = {int(c) for v in pixels.values() for c in v}
    assert present == set(range(1, 21))


def test_episodes_deterministic_distinct_supports(synthetic):
    pre, sp = prepared_dir(synthetic, "synthetic"), split_dir(synthetic, "synthetic", 0)
    ds = EpisodeDataset(pre, sp / "val.jsonl", shots=2, mode="test", size=48, seed=510, episodes=20)
    ds2 = EpisodeDataset(pre, sp / "val.jsonl", shots=2, mode="test", size=48, seed=510, episodes=20)
    assert [ds.episode(i) for i in range(20)] == [ds2.episode(i) for i in range(20)]
    other = EpisodeDataset(pre, sp / "val.jsonl", shots=2, mode="test", size=48, seed=365, episodes=20)
    assert [ds.episode(i)[:3] for i in range(20)] != [other.episode(i)[:3] for i in range(20)]
    for i in range(20):
        q, c, sup, _ = ds.episode(i)
        assert len(set(sup)) == 2 and q not in sup
        assert c in novel_classes("synthetic", 0)
    ep = ds[0]
    assert ep["query"].shape == (3, 48, 48) and ep["support"].shape == (2, 3, 48, 48)
    assert ep["support_mask"].shape == (2, 48, 48)
    assert ep["label"].shape == (64, 64)      # original resolution kept for scoring
    assert set(ep["label"].unique().tolist()) <= {0, 1, 255}
    assert (ep["label"] == 1).any()

    tr = EpisodeDataset(pre, sp / "train.jsonl", shots=1, mode="train", size=48, seed=1)
    a, b = tr[3], tr[3]
    assert torch.equal(a["query"], b["query"]) and torch.equal(a["support_mask"], b["support_mask"])
    tr.set_epoch(1)
    assert not torch.equal(tr[3]["query"], a["query"])
    assert a["query"].shape == (3, 48, 48) and set(a["query_mask"].unique().tolist()) <= {0, 1, 255}


def test_binarize_and_transforms():
    lab = torch.tensor([[0, 3, 3], [255, 5, 3]], dtype=torch.uint8)
    assert binarize(lab, 3).tolist() == [[0, 1, 1], [255, 0, 1]]
    img = torch.randint(0, 255, (3, 30, 60), dtype=torch.uint8)
    mask = torch.ones(30, 60, dtype=torch.uint8)
    x, m, valid = eval_transform(img, mask, 40)
    assert x.shape == (3, 40, 40) and valid == (20, 40)
    assert (m[20:] == 255).all() and (m[:20] == 1).all()
    assert x[:, 20:].abs().max() < 0.02      # mean-colour padding normalises to ~0
    torch.manual_seed(0)
    xi, mi = TrainTransform(50)(img, mask)
    assert xi.shape == (3, 50, 50) and mi.shape == (50, 50) and xi.dtype == mi.dtype == torch.uint8
    assert set(mi.unique().tolist()) <= {1, 255}
    # the workers ship uint8; the model's device normalises to the bits the CPU would
    batch = to_model({"query": xi[None], "support_mask": mi[None, None], "query_mask": mi[None]}, "cpu")
    assert torch.equal(batch["query"], normalize(xi)[None])
    assert batch["support_mask"].dtype == torch.float32 and batch["query_mask"].dtype == torch.int64


@pytest.mark.parametrize("protocol", ["random", "bam"])
def test_the_test_image_is_resize_pad_normalize_to_the_bit(protocol):
    """eval_image writes the resized pixels into a padded float buffer and normalises in place: the same
    bits as the three steps one after another (what the evaluation and the service both feed the model)."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as TF
    g = torch.Generator().manual_seed(0)
    for h, w in ((500, 375), (30, 60), (64, 64), (700, 90)):
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        x, (nh, nw) = eval_image(img, 64, protocol)
        assert (nh, nw) == eval_size(h, w, 64, protocol)
        src = img.float() if protocol == "bam" else img          # the authors resize float pixels
        ref = TF.resize(tv_tensors.Image(src), [nh, nw], antialias=protocol != "bam")
        ref = TF.pad(ref, [0, 0, 64 - nw, 64 - nh], fill=[0, 0, 0] if protocol == "bam" else MEAN_255)
        ref = TF.normalize(ref.float() / 255.0, MEAN, STD)
        assert x.dtype == torch.float32 and torch.equal(x, ref), (h, w)


def _object_hue(img: torch.Tensor, mask: torch.Tensor) -> float:
    """Hue (0..1) of the mean colour of the mask's pixels of a uint8 (training) or normalised (test) image."""
    import colorsys
    rgb = img.permute(1, 2, 0) / 255.0 if img.dtype == torch.uint8 else img.permute(1, 2, 0) * torch.tensor(STD) + torch.tensor(MEAN)
    return colorsys.rgb_to_hsv(*rgb[mask == 1].mean(0).clamp(0, 1).tolist())[0]


def test_a_too_small_dev_shm_is_named_with_the_fix(synthetic):
    """Against the machine's real /dev/shm: a prefetch larger than its free space stops before any worker starts."""
    import shutil

    from pipeline.data.episodes import check_shared_memory
    pre, sp = prepared_dir(synthetic, "synthetic"), split_dir(synthetic, "synthetic", 0)
    ds = EpisodeDataset(pre, sp / "train.jsonl", shots=1, mode="train", size=48, seed=1)
    need = check_shared_memory(ds, 8, 2, 2, "train")
    assert need == 8 * 2 * 2 * (2 * 3 * 48 * 48 + 2 * 48 * 48)       # uint8 query, support and masks
    free = shutil.disk_usage("/dev/shm").free
    with pytest.raises(RuntimeError, match=r"/dev/shm has \d+ MiB free; 2 loader workers x 2 batches .*--shm-size.*"
                                           r"lower train.workers"):
        check_shared_memory(ds, free // (2 * 2 * 13824) + 1, 2, 2, "train")


def test_hue_jitter_turns_query_and_supports_alike(synthetic):
    """One hue rotation per episode: query and support objects of the class keep one colour (what the
    head must compare), while the colour itself changes from the unjittered episode."""
    pre, sp = prepared_dir(synthetic, "synthetic"), split_dir(synthetic, "synthetic", 0)
    plain = EpisodeDataset(pre, sp / "train.jsonl", shots=1, mode="train", size=64, seed=1, scale=(1, 1), rotate=0)
    turned = EpisodeDataset(pre, sp / "train.jsonl", shots=1, mode="train", size=64, seed=1, scale=(1, 1), rotate=0,
                            hue_jitter=0.5)

    def gap(a, b):
        return min(abs(a - b), 1 - abs(a - b))
    moved = []
    for i in range(8):
        p, t = plain[i], turned[i]
        assert plain.episode(i) == turned.episode(i)
        q_hue, s_hue = _object_hue(t["query"], t["query_mask"]), _object_hue(t["support"][0], t["support_mask"][0])
        assert gap(q_hue, s_hue) < 0.04, (i, q_hue, s_hue)
        moved.append(gap(q_hue, _object_hue(p["query"], p["query_mask"])))
        assert torch.equal(t["query_mask"], p["query_mask"])         # geometry untouched
    assert max(moved) > 0.1, moved
    ev = EpisodeDataset(pre, sp / "val.jsonl", shots=1, mode="test", size=64, seed=5, episodes=2, hue_jitter=0.5)
    assert ev.hue_jitter == 0.0                                         # never at test time


def test_pretraining_families_are_not_benchmark_shapes():
    """The stand-in for ImageNet never shows a benchmark class: every pretraining family differs from
    every one of the 20 benchmark shapes (best IoU over rotations and mirroring, both scaled to the
    same outer radius, below 0.9; disc and hexagon, two benchmark classes, are 0.83 apart)."""
    import math

    from pipeline.data.synthetic import PRETRAIN_FAMILIES, SHAPES, pretrain_family

    def raster(outer, holes, angle, flip, size=64):
        r = max(math.hypot(x, y) for poly in outer for x, y in poly)
        ca, sa = math.cos(angle), math.sin(angle)
        m = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(m)
        for polys, fill in ((outer, 255), (holes, 0)):
            for poly in polys:
                draw.polygon([(size / 2 + 0.45 * size * ((-x if flip else x) * ca - y * sa) / r,
                               size / 2 + 0.45 * size * ((-x if flip else x) * sa + y * ca) / r) for x, y in poly],
                             fill=fill)
        return np.asarray(m) > 127

    bench = [raster(o, h, a, f) for o, h in SHAPES.values() for a in np.linspace(0, 2 * math.pi, 36, endpoint=False)
             for f in (False, True)]
    for k in range(PRETRAIN_FAMILIES):
        fam = raster([pretrain_family(k)], [], 0.0, False)
        best = max((fam & b).sum() / (fam | b).sum() for b in bench)
        assert best < 0.9, (k, best)


# ------------------------------------------------------------------ your own data (data.benchmark: folder)
def _folder_cfg(root: Path, data_root: Path, **split):
    from pipeline.config import load_config
    return load_config({"data": {"benchmark": "folder", "root": str(data_root), "folder": {"root": str(root)}},
                        "split": {"min_pixels": 20, **split}})


def _prepare_folder(cfg):
    return prepare("folder", cfg.data.folder.root, prepared_dir(cfg.data.root, "folder"), workers=1,
                   folder=cfg.data.folder)


def test_folder_benchmark_labels_or_coco_json_give_the_same_prepared_data(tmp_path):
    """A folder of images + label PNGs + classes.txt is prepared, reported and cut into folds like PASCAL
    (or by explicit novel class names); the same folder described by a COCO instances JSON gives the same
    class pixels (the 255 band aside, which COCO cannot carry)."""
    from pipeline.data.benchmarks import fold_classes
    from pipeline.data.synthetic import write_folder_example
    root = write_folder_example(tmp_path / "own", num_images=40, size=48, seed=3, classes=4)
    cfg = _folder_cfg(root, tmp_path / "data", num_folds=2, folds=[0, 1])
    counts = _prepare_folder(cfg)
    prepared = prepared_dir(cfg.data.root, "folder")
    assert counts["train_images"] == 30 and counts["val_images"] == 10      # val_fraction 0.25 of 40
    assert json.loads((prepared / "classes.json").read_text())["names"] == ["disc", "square", "triangle", "star"]
    report = json.loads((prepared / "class_report.json").read_text())
    assert [r["name"] for r in report] == ["disc", "square", "triangle", "star"] and all(r["images"] for r in report)
    assert fold_classes(cfg, 0) == ([1, 2], [3, 4]) and fold_classes(cfg, 1) == ([3, 4], [1, 2])
    named = _folder_cfg(root, tmp_path / "data", novel_classes=["star", 1])
    assert fold_classes(named, 0) == ([1, 4], [2, 3])
    with pytest.raises(ValueError, match="'cat' is not in the class list"):
        fold_classes(_folder_cfg(root, tmp_path / "data", novel_classes=["cat"]), 0)
    summary = make_splits(prepared, split_dir(cfg.data.root, "folder"), {f: fold_classes(cfg, f) for f in (0, 1)},
                          20, "bam", checked=[0, 1])
    assert summary["fold0"]["val_pairs"] > 0 and summary["fold1"]["train_pairs"] > 0
    for i, c in read_pairs(split_dir(cfg.data.root, "folder", 0) / "val.jsonl"):
        assert c in (1, 2)
    pixels = json.loads((prepared / "class_pixels.json").read_text())

    from pycocotools import mask as mask_utils
    coco = tmp_path / "own_coco"
    (coco / "images").mkdir(parents=True)
    images, anns = [], []
    for k, f in enumerate(sorted((root / "images").iterdir())):
        (coco / "images" / f.name).write_bytes(f.read_bytes())
        lab = np.array(Image.open(root / "labels" / f"{f.stem}.png"))
        images.append({"id": k + 1, "file_name": f.name, "height": lab.shape[0], "width": lab.shape[1]})
        for c in sorted(set(np.unique(lab).tolist()) - {0, 255}):
            r = mask_utils.encode(np.asfortranarray((lab == c).astype(np.uint8)))
            anns.append({"id": len(anns) + 1, "image_id": k + 1, "category_id": 10 * c, "iscrowd": 0,
                         "segmentation": {"size": r["size"], "counts": r["counts"].decode()}, "area": 1, "bbox": [0] * 4})
    cats = [{"id": 10 * (i + 1), "name": n} for i, n in enumerate(["disc", "square", "triangle", "star"])]
    (coco / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    ccfg = _folder_cfg(coco, tmp_path / "data_coco", num_folds=2)
    assert _prepare_folder(ccfg)["train_images"] == 30
    cprep = prepared_dir(ccfg.data.root, "folder")
    assert json.loads((cprep / "classes.json").read_text())["names"] == ["disc", "square", "triangle", "star"]
    assert (cprep / "train.txt").read_text() == (prepared / "train.txt").read_text()
    cpixels = json.loads((cprep / "class_pixels.json").read_text())
    assert cpixels.keys() == pixels.keys()
    for name in pixels:
        assert cpixels[name].keys() == pixels[name].keys()
        assert all(cpixels[name][c] >= pixels[name][c] for c in pixels[name])


def test_folder_benchmark_bad_input_is_named_and_nothing_is_half_written(tmp_path, caplog):
    from pipeline.data.folder import FolderError
    from pipeline.data.split import SplitError
    from pipeline.data.synthetic import write_folder_example
    good = write_folder_example(tmp_path / "good", num_images=12, size=40, seed=1, classes=3)
    cfg = _folder_cfg(good, tmp_path / "data", num_folds=3)
    _prepare_folder(cfg)
    prepared = prepared_dir(cfg.data.root, "folder")
    before = sorted(p.name for p in (prepared / "labels").iterdir())

    def broken(name, change):
        import shutil
        d = tmp_path / name
        shutil.copytree(good, d)
        change(d)
        return _prepare_folder(_folder_cfg(d, tmp_path / "data", num_folds=3))

    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    with pytest.raises(FolderError, match="holds no .jpg, .jpeg or .png image"):
        _prepare_folder(_folder_cfg(empty, tmp_path / "data"))
    with pytest.raises(FolderError, match="have no label .*photo_004"):
        broken("nolabel", lambda d: (d / "labels" / "photo_004.png").unlink())
    with pytest.raises(FolderError, match="classes.txt is missing"):
        broken("noclasses", lambda d: (d / "classes.txt").unlink())
    with pytest.raises(PrepareError, match=r"photo_002.png is 40x20, its image .*photo_002.jpg is 40x40"):
        broken("size", lambda d: Image.fromarray(np.zeros((20, 40), np.uint8)).save(d / "labels" / "photo_002.png"))
    with pytest.raises(PrepareError, match=r"photo_003.png holds class ids \[7\] outside 0..3"):
        broken("index", lambda d: Image.fromarray(np.full((40, 40), 7, np.uint8)).save(d / "labels" / "photo_003.png"))
    with pytest.raises(PrepareError, match="unreadable image .*photo_005.jpg"):
        broken("corrupt", lambda d: (d / "images" / "photo_005.jpg").write_bytes(b"not a jpeg"))
    with pytest.raises(PrepareError, match="photo_001.png has 3 channels; a label is a single-channel PNG"):
        broken("rgb", lambda d: Image.new("RGB", (40, 40)).save(d / "labels" / "photo_001.png"))
    assert sorted(p.name for p in (prepared / "labels").iterdir()) == before      # the good result untouched
    assert [p.name for p in prepared.parent.glob(".*.tmp")] == [".folder.tmp"]      # the work so far, for a rerun
    _prepare_folder(cfg)
    assert not list(prepared.parent.glob(".*.tmp"))                                # gone once complete

    caplog.clear()
    broken("extra", lambda d: (d / "images" / "notes.txt").write_text("x"))       # skipped with a warning
    assert "notes.txt" in caplog.text
    caplog.clear()
    broken("fewer", lambda d: (d / "classes.txt").write_text("disc\nsquare\ntriangle\nhexagon\n"))
    assert "hexagon appear in no label" in caplog.text

    from pipeline.data.benchmarks import fold_classes
    cfg = _folder_cfg(good, tmp_path / "data", novel_classes=["triangle"], min_pixels=10 ** 6)
    _prepare_folder(cfg)
    out = split_dir(cfg.data.root, "folder")
    with pytest.raises(SplitError, match="fold 0: novel class\\(es\\) triangle \\(0 images\\)"):
        make_splits(prepared, out, {0: fold_classes(cfg, 0)}, 10 ** 6, "bam", checked=[0], names=["disc", "square",
                                                                                                  "triangle"])
    assert not (out / "fold0" / "val.jsonl").exists()


def test_folder_split_parameters_are_validated():
    from pipeline.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="split.num_folds and split.novel_classes are for data.benchmark: folder"):
        load_config({"split": {"num_folds": 5}})
    with pytest.raises(ConfigError, match=r"split.folds: fold 1 does not exist; choose from \[0\]"):
        load_config({"data": {"benchmark": "folder"}, "split": {"novel_classes": ["a"], "folds": [1]}})
    with pytest.raises(ConfigError, match=r"choose from \[0, 1, 2, 3, 4, 5\]"):
        load_config({"data": {"benchmark": "folder"}, "split": {"num_folds": 6, "folds": [6]}})
    assert load_config({"data": {"benchmark": "folder"}, "split": {"num_folds": 6, "folds": [5]}}).split.folds == [5]


def test_the_committed_example_folder_is_the_scripts_output(tmp_path):
    """examples/folder (the default data.folder.root) is what `python examples/folder_example.py` writes."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "examples/folder_example.py", str(tmp_path / "ex")], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    committed = root / "examples" / "folder"
    assert (tmp_path / "ex/classes.txt").read_text() == (committed / "classes.txt").read_text()
    names = sorted(p.name for p in (committed / "labels").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ex/labels").iterdir()) and len(names) == 72
    for n in names:
        assert np.array_equal(np.array(Image.open(committed / "labels" / n)), np.array(Image.open(tmp_path / "ex/labels" / n)))
        a, b = (np.array(Image.open(d / "images" / n.replace(".png", ".jpg")), np.int16) for d in (committed, tmp_path / "ex"))
        assert np.abs(a - b).mean() < 1.0
