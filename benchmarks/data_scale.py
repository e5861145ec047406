"""The data path at the real benchmarks' scale, without the data: a stand-in of PASCAL-5i or COCO-20i made here
(the real image sizes, annotation density and file formats; cheap content), run through download (from a
loopback mirror), prepare, split, the training loader and validation's per-episode work. Prints, per stage, the
CPU per item, the wall time here, the projection for the real counts on a 16-core machine, peak memory and disk.

    python benchmarks/data_scale.py [--benchmark coco|pascal] [--images 600] [--workers auto] [--crop 473]

The stand-in's JPEGs are smooth gradients under the label's shapes (a real photo's entropy decoding costs
somewhat more). Only ``--images`` images are made; per-item costs are measured on them and scaled to the
real counts (COCO 2014: 123,287 images, 7.3 instances each; PASCAL VOC2012 + SBD: 12,031 prepared images).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import tarfile
import tempfile
import threading
import time
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data import sources
from pipeline.data.benchmarks import data_workers, prepared_dir, protocol_folds, split_dir
from pipeline.data.download import Resource, file_digest
from pipeline.data.prepare import prepare
from pipeline.data.split import make_splits

REAL = {"coco": {"images": 123_287, "train": 82_783, "instances": 7.3, "archives": 20.4e9, "json": 332e6 + 160e6},
        "pascal": {"images": 12_031, "train": 10_582, "instances": 2.4, "archives": 3.4e9}}
COCO_SIZES = [(640, 480), (640, 427), (480, 640), (640, 424), (612, 612), (500, 375)]
PASCAL_SIZES = [(500, 375), (500, 333), (375, 500), (500, 500)]
COCO_GAPS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO_IDS = [c for c in range(1, 91) if c not in COCO_GAPS]


def _shapes(rng, w, h, n):
    """n random star-shaped polygons (8-40 vertices, COCO's typical) as flat [x0, y0, x1, y1, ...] lists."""
    polys = []
    for _ in range(n):
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
        r = rng.uniform(0.05, 0.3) * min(w, h)
        k = int(rng.integers(8, 41))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = r * rng.uniform(0.5, 1.0, k)
        xs = np.clip(cx + rad * np.cos(ang), 0, w - 1)
        ys = np.clip(cy + rad * np.sin(ang), 0, h - 1)
        polys.append([round(float(v), 2) for xy in zip(xs, ys) for v in xy])
    return polys


def _jpeg(rng, w, h, polys, colors) -> bytes:
    x = np.linspace(0, 255, w, dtype=np.float32)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    base = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], -1).astype(np.uint8)
    im = Image.fromarray(base)
    draw = ImageDraw.Draw(im)
    for p, c in zip(polys, colors):
        draw.polygon(p, fill=c)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def build_coco(out: Path, n: int, seed: int = 0) -> list[tuple[Resource, str]]:
    rng = np.random.default_rng(seed)
    n_val = n // 3
    split_of = {"train": range(1, n - n_val + 1), "val": range(n - n_val + 1, n + 1)}
    cats = [{"id": c, "name": f"class{c}", "supercategory": "x"} for c in COCO_IDS]
    docs, ann_id = {}, 0
    for split, ids in split_of.items():
        images, anns = [], []
        with zipfile.ZipFile(out / f"{split}2014.zip", "w", zipfile.ZIP_STORED) as zf:
            for i in ids:
                w, h = COCO_SIZES[int(rng.integers(len(COCO_SIZES)))]
                k = max(1, int(rng.poisson(REAL["coco"]["instances"])))
                polys = _shapes(rng, w, h, k)
                name = f"COCO_{split}2014_{i:012d}.jpg"
                zf.writestr(f"{split}2014/{name}", _jpeg(rng, w, h, polys, [tuple(rng.integers(0, 255, 3)) for _ in polys]))
                images.append({"id": i, "width": w, "height": h, "file_name": name})
                for p in polys:
                    ann_id += 1
                    anns.append({"id": ann_id, "image_id": i, "category_id": int(rng.choice(COCO_IDS)), "iscrowd": 0,
                                 "segmentation": [p], "area": 1.0, "bbox": [0, 0, 1, 1]})
        docs[split] = {"images": images, "annotations": anns, "categories": cats}
    with zipfile.ZipFile(out / "annotations_trainval2014.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for split, doc in docs.items():
            zf.writestr(f"annotations/instances_{split}2014.json", json.dumps(doc))
    return [(Resource("", r.filename, md5=file_digest(out / r.filename, "md5")), m) for r, m in sources.COCO]


def build_pascal(out: Path, n: int, seed: int = 0) -> list[tuple[Resource, str | None]]:
    """VOC's segmentation train/val as a third each, the rest SBD-only (train_noval), as in the real lists."""
    from scipy.io import savemat
    rng = np.random.default_rng(seed)
    names = [f"2010_{i:06d}" for i in range(n)]
    voc_train, voc_val, sbd = names[: n // 3], names[n // 3: 2 * n // 3], names[2 * n // 3:]
    palette = [v for i in range(256) for v in (i, i, i)]
    with tarfile.open(out / "VOCtrainval_11-May-2012.tar", "w") as vt, tarfile.open(out / "benchmark.tgz", "w:gz") as st:
        def add(tf, name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for i in names:
            w, h = PASCAL_SIZES[int(rng.integers(len(PASCAL_SIZES)))]
            polys = _shapes(rng, w, h, max(1, int(rng.poisson(REAL["pascal"]["instances"]))))
            classes = [int(c) for c in rng.integers(1, 21, len(polys))]
            add(vt, f"VOCdevkit/VOC2012/JPEGImages/{i}.jpg", _jpeg(rng, w, h, polys, [(c * 12, 90, 200) for c in classes]))
            lab = Image.new("L", (w, h), 0)
            draw = ImageDraw.Draw(lab)
            for p, c in zip(polys, classes):
                draw.polygon(p, fill=c, outline=255)
            if i in sbd:
                buf = io.BytesIO()
                savemat(buf, {"GTcls": {"Segmentation": np.asarray(lab, np.uint8)}}, do_compression=True)
                add(st, f"benchmark_RELEASE/dataset/cls/{i}.mat", buf.getvalue())
            else:
                im = lab.convert("P")
                im.putpalette(palette)
                buf = io.BytesIO()
                im.save(buf, "PNG")
                add(vt, f"VOCdevkit/VOC2012/SegmentationClass/{i}.png", buf.getvalue())
        add(vt, "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt", ("\n".join(voc_train) + "\n").encode())
        add(vt, "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt", ("\n".join(voc_val) + "\n").encode())
    (out / "train_noval.txt").write_text("\n".join(sbd) + "\n")
    return [(Resource("", r.filename, md5=file_digest(out / r.filename, "md5")), m) for r, m in sources.PASCAL]


class PeakWorkers:
    """The largest resident memory of any process below this one (prepare's workers run under a fork server)."""

    def __enter__(self):
        import psutil
        self.rss, self.stop = 0, threading.Event()

        def poll():
            me = psutil.Process()
            while not self.stop.wait(0.1):
                for p in me.children(recursive=True):
                    try:
                        self.rss = max(self.rss, p.memory_info().rss)
                    except psutil.Error:
                        pass
        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


class Mirror:
    """The stand-in's archives on 127.0.0.1."""

    def __init__(self, folder: Path):
        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *a):
                pass
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def disk(path: Path) -> int:
    """Bytes under ``path``, each inode once (hard links are one file on disk)."""
    seen, total = set(), 0
    for f in path.rglob("*"):
        st = f.lstat()
        if f.is_file() and st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_size
    return total


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def timed(fn):
    t, c = time.perf_counter(), cpu()
    out = fn()
    return out, time.perf_counter() - t, cpu() - c


def loader_cost(prepared: Path, pairs: Path, crop: int, n: int) -> tuple[float, int]:
    """CPU seconds per training episode (1 shot: query + support) in one process, one thread; batch bytes."""
    import torch

    from pipeline.data.episodes import EpisodeDataset
    torch.set_num_threads(1)
    ds = EpisodeDataset(prepared, pairs, shots=1, mode="train", size=crop, sampling="image")
    item = ds[0]
    nbytes = sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))
    c = cpu()
    for i in range(1, n + 1):
        ds[i % len(ds)]
    return (cpu() - c) / n, nbytes


def validation_cost(prepared: Path, pairs: Path, size: int, n: int) -> tuple[float, float]:
    """CPU seconds per validation episode, one thread: (the episode's data: loading, resizing, padding, which
    the loader's workers do; the scoring at the original size: upsampling, comparison, IoU sums, which runs
    on the model's device: on a GPU it leaves the CPU)."""
    import torch

    from pipeline.data.episodes import EpisodeDataset
    from pipeline.evaluate import IoUAccumulator, predict_original
    torch.set_num_threads(1)
    ds = EpisodeDataset(prepared, pairs, shots=1, mode="test", size=size, episodes=n, seed=1)
    acc = IoUAccumulator(classes=ds.classes)
    logits = torch.randn(2, size, size)      # the model's output: the padded test image's size
    c = cpu()
    eps = [ds[i] for i in range(n)]
    data = (cpu() - c) / n
    c = cpu()
    for ep in eps:
        acc.add(predict_original(logits, ep["valid"].tolist(), ep["label"].shape), ep["label"], ep["class"])
    return data, (cpu() - c) / n


def parse_at_real_size(work: Path, seed: int = 0) -> dict:
    """instances_train2014.json at its real size (82,783 images, ~605,000 polygon instances; no image files),
    parsed by prepare's reader in a process of its own: its time and peak memory, the parent's serial part."""
    import subprocess
    import sys
    rng = np.random.default_rng(seed)
    path = work / "instances_train2014.json"
    n_img, n_ann = 82_783, 604_907
    owners = np.sort(rng.integers(1, n_img + 1, n_ann))
    with open(path, "w") as f:
        f.write('{"images": [')
        f.write(",".join(json.dumps({"id": i, "width": 640, "height": 480, "file_name": f"COCO_train2014_{i:012d}.jpg"})
                         for i in range(1, n_img + 1)))
        f.write('], "categories": ' + json.dumps([{"id": c, "name": f"class{c}", "supercategory": "x"} for c in COCO_IDS]))
        f.write(', "annotations": [')
        for k, owner in enumerate(owners):
            poly = _shapes(rng, 640, 480, 1)[0]
            f.write(("," if k else "") + json.dumps({"id": k + 1, "image_id": int(owner), "category_id": COCO_IDS[k % 80],
                                                     "iscrowd": 0, "segmentation": [poly], "area": 1.0,
                                                     "bbox": [0, 0, 1, 1]}))
        f.write("]}")
    code = ("import resource, sys, time; from pipeline.data.folder import coco_instances; t = time.process_time(); "
            f"names, images = coco_instances({str(path)!r}); "
            "print(time.process_time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, len(images))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    return {"json_mb": path.stat().st_size / 1e6, "cpu_s": float(out[-3]), "peak_mb": float(out[-2])}


def main():
    ap = argparse.ArgumentParser(prog="python benchmarks/data_scale.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", default="coco", choices=("coco", "pascal"))
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--workers", default="auto", help="prepare's processes (auto: every core)")
    ap.add_argument("--crop", type=int, default=473)
    ap.add_argument("--episodes", type=int, default=60, help="loader and validation episodes timed")
    ap.add_argument("--cores", type=int, default=16, help="the machine projected to")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--real-json", action="store_true",
                    help="COCO: also parse an instances file of the real size (~330 MB; a minute, a few GB of memory)")
    args = ap.parse_args()
    bench, n, real = args.benchmark, args.images, REAL[args.benchmark]
    workers = data_workers(args.workers if args.workers == "auto" else int(args.workers))
    work = Path(tempfile.mkdtemp(prefix="svf-fss-scale-"))
    try:
        mirror_dir = work / "mirror"
        mirror_dir.mkdir()
        print(f"making a {bench} stand-in of {n} images in {work} ...", flush=True)
        resources, t_build, _ = timed(lambda: (build_coco if bench == "coco" else build_pascal)(mirror_dir, n))
        archive_bytes = sum(f.stat().st_size for f in mirror_dir.iterdir())
        mirror = Mirror(mirror_dir)
        try:
            res = [(r.with_url(f"{mirror.url}/{r.filename}"), m) for r, m in resources]
            raw, t_dl, c_dl = timed(lambda: sources.fetch_benchmark(bench, work / "data", resources=res))
        finally:
            mirror.close()
        # fetching costs by the byte: the stand-in's JPEGs are smaller than real photos
        rows = [("download + verify + extract", n, t_dl, c_dl, None, c_dl / archive_bytes * real["archives"])]
        c_js = 0.0
        if bench == "coco":         # the parent's serial part: parsing the instances files, by the byte
            from pipeline.data.folder import coco_instances
            anns = [raw / "annotations" / f"instances_{s}2014.json" for s in ("train", "val")]
            size = sum(a.stat().st_size for a in anns)
            _, t_js, c_js = timed(lambda: [coco_instances(a) for a in anns])
            rows.append((f"annotations parse ({size / 1e6:.1f} MB here; serial)", n, t_js, c_js, None,
                         c_js / size * real["json"]))
        one = work / "one"
        _, t_p1, c_p1 = timed(lambda: prepare(bench, raw, one / bench, workers=0))
        peak_one = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        shutil.rmtree(one)
        out = prepared_dir(work / "data", bench)
        with PeakWorkers() as peak:
            summary, t_pn, _ = timed(lambda: prepare(bench, raw, out, workers=workers))
        per_image = c_p1 - c_js
        rows.append(("prepare, per image (in one process)", n, t_p1, per_image, None,
                     per_image / n * real["images"] / args.cores))
        rows.append((f"prepare ({workers} worker processes, parse included)", n, t_pn, c_p1, None, None))
        _, t_sp, c_sp = timed(lambda: make_splits(out, split_dir(work / "data", bench), protocol_folds(bench, range(4)),
                                                  2048, "bam"))
        rows.append(("split (4 folds)", n, t_sp, c_sp, None, c_sp / n * real["images"]))
        pairs = split_dir(work / "data", bench, 0)
        per_ep, nbytes = loader_cost(out, pairs / "train.jsonl", args.crop, args.episodes)
        val_data, val_score = validation_cost(out, pairs / "val.jsonl", args.crop, args.episodes)
        raw_disk, prep_disk = disk(raw), disk(out) - 0
        both = disk(work / "data")
        print()
        print(f"{bench} stand-in: {n} images ({archive_bytes / 1e6:.0f} MB of archives, made in {t_build:.0f} s); "
              f"this machine: {os.cpu_count()} cores; projection: {real['images']:,} images on {args.cores} cores")
        print(f"| stage | CPU per image | wall here | projected wall, {args.cores} cores |")
        print("|---|---|---|---|")
        for name, items, wall, c, _, proj in rows:
            print(f"| {name} | {c / items * 1e3:.1f} ms | {wall:.1f} s | {duration(proj)} |")
        train_eps = real["train"]
        print(f"| training loader, 1 shot at {args.crop} px | {per_ep / 2 * 1e3:.1f} ms an image "
              f"({per_ep * 1e3:.1f} ms an episode) | | {1 / per_ep:.0f} episodes/s a worker, "
              f"{args.cores // 2} workers {args.cores // 2 / per_ep:.0f}/s; {nbytes / 1e6:.1f} MB an episode |")
        print(f"| validation episode, its data (loader workers) | {val_data * 1e3:.1f} ms | | 1,000 episodes: "
              f"{val_data * 1000:.0f} s in one process, {val_data * 1000 / (args.cores // 2):.1f} s with "
              f"{args.cores // 2} workers |")
        print(f"| validation episode, scoring (the model's device; here the CPU) | {val_score * 1e3:.1f} ms | | "
              f"1,000 episodes {val_score * 1000:.1f} s on a CPU |")
        print(f"peak memory: prepare in one process (annotations parsed, every image) {peak_one:.0f} MB; "
              f"largest worker {peak.rss / 2 ** 20:.0f} MB")
        print(f"disk: raw {raw_disk / 1e6:.0f} MB (archives kept), prepared adds {(both - raw_disk) / 1e6:.0f} MB "
              f"(its images are links to the raw ones); an epoch is {train_eps:,} training episodes")
        if bench == "coco" and args.real_json:
            big = parse_at_real_size(work)
            print(f"instances_train2014.json at its real size ({big['json_mb']:.0f} MB): parsed by prepare's reader in "
                  f"{big['cpu_s']:.0f} s of CPU, peak {big['peak_mb']:.0f} MB (the parent's serial part; val is half)")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "benchmark": bench, "images": n, "cores_here": os.cpu_count(),
                "stages": [{"stage": r[0], "cpu_ms_per_image": r[3] / r[1] * 1e3, "wall_s": r[2],
                            "projected_min": None if r[5] is None else r[5] / 60} for r in rows],
                "loader_ms_per_episode": per_ep * 1e3, "episode_bytes": nbytes,
                "validation_data_ms_per_episode": val_data * 1e3, "validation_scoring_ms_per_episode": val_score * 1e3,
                "peak_one_process_mb": peak_one, "peak_worker_mb": peak.rss / 2 ** 20, "skipped": summary.get("skipped_annotations"),
                "disk_raw_mb": raw_disk / 1e6, "disk_prepared_extra_mb": (both - raw_disk) / 1e6}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
