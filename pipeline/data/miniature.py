"""Miniature benchmark archives in the real layouts (PASCAL VOC + SBD, COCO 2014), and a loopback HTTP server
that serves them: what `python -m stages.rehearse` runs a preset on, and what the tests fetch with the real
download code. The server understands Range requests (for resume) and can be told to cut a response short.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _jpeg(h, w, seed) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png(arr, palette=False) -> bytes:
    im = Image.fromarray(arr.astype(np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, i, i)])
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def block_label(h, w, blocks):
    """Label with rectangles: blocks = [(class, y0, y1, x0, x1), ...]."""
    lab = np.zeros((h, w), np.uint8)
    for c, y0, y1, x0, x1 in blocks:
        lab[y0:y1, x0:x1] = c
    return lab


# Small PASCAL: VOC seg train {a, b}, val {v1, v2}; SBD train_noval {b, s1, s2} (b duplicated).
PASCAL_LABELS = {
    # 64 x 64 = 4096 px: class 1 with exactly 2048 px (kept), class 2 with 2047 px (dropped)
    "2007_a": block_label(64, 64, [(1, 0, 32, 0, 64), (2, 32, 64, 0, 64), (0, 63, 64, 63, 64)]),
    "2007_b": block_label(64, 64, [(7, 0, 64, 0, 40)]),
    "2008_s1": block_label(64, 64, [(3, 0, 64, 0, 48), (6, 60, 64, 0, 4)]),    # novel class 6 (fold 1) tiny
    "2008_s2": block_label(64, 64, [(12, 0, 64, 0, 64)]),
    "2009_v1": block_label(64, 64, [(1, 0, 64, 0, 40), (11, 0, 64, 40, 64)]),
    "2009_v2": block_label(64, 64, [(2, 0, 64, 0, 64)]),
}


def episode_blocks(novel, base, per_class: int = 2) -> tuple[list, list]:
    """(train, val) lists of (name, class): every base class in ``per_class`` training images and every novel
    class in as many val images, each covering the top 40 of 64 rows: enough for episodes of every class."""
    train = [(f"t{c:02d}{i}", c) for c in base for i in range(per_class)]
    return train, [(f"v{c:02d}{i}", c) for c in novel for i in range(per_class)]


def build_pascal(out: Path, episodes: tuple[list, list] | None = None) -> dict:
    """The small PASCAL above, or with ``episodes`` (episode_blocks) a VOC val and SBD train of one block each."""
    out.mkdir(parents=True, exist_ok=True)
    voc_train, voc_val, sbd_train = ["2007_a", "2007_b"], ["2009_v1", "2009_v2"], ["2007_b", "2008_s1", "2008_s2"]
    labels = PASCAL_LABELS
    if episodes is not None:
        labels = {n: block_label(64, 64, [(c, 0, 40, 0, 64)]) for n, c in episodes[0] + episodes[1]}
        voc_train, voc_val, sbd_train = [], [n for n, _ in episodes[1]], [n for n, _ in episodes[0]]
    with tarfile.open(out / "VOCtrainval_11-May-2012.tar", "w") as tf:
        root = "VOCdevkit/VOC2012"
        for i, name in enumerate(labels):
            _add(tf, f"{root}/JPEGImages/{name}.jpg", _jpeg(64, 64, i))
        for name in voc_train + voc_val:
            lab = labels[name].copy()
            if name != "2007_a":
                lab[0, :] = 255   # VOC's boundary band
            _add(tf, f"{root}/SegmentationClass/{name}.png", _png(lab, palette=True))
        _add(tf, f"{root}/ImageSets/Segmentation/train.txt", ("\n".join(voc_train) + "\n").encode())
        _add(tf, f"{root}/ImageSets/Segmentation/val.txt", ("\n".join(voc_val) + "\n").encode())
    with tarfile.open(out / "benchmark.tgz", "w:gz") as tf:
        for name in sbd_train:
            buf = io.BytesIO()
            savemat(buf, {"GTcls": {"Segmentation": labels[name], "Boundaries": np.zeros((1,)),
                                    "CategoriesPresent": np.unique(labels[name])[1:]}})
            _add(tf, f"benchmark_RELEASE/dataset/cls/{name}.mat", buf.getvalue())
        _add(tf, "benchmark_RELEASE/dataset/train.txt", ("\n".join(sbd_train) + "\n").encode())
    (out / "train_noval.txt").write_text("\n".join(sbd_train) + "\n")
    return {f.name: md5(f) for f in out.iterdir()}


COCO_CAT_IDS = [c for c in range(1, 91) if c not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def build_coco(out: Path, episodes: tuple[list, list] | None = None) -> dict:
    """Two train and one val image. Real COCO category ids (with gaps), polygons, RLE and a crowd. With
    ``episodes`` (episode_blocks, contiguous class ids): one polygon of its class over each image's top rows."""
    from pycocotools import mask as mask_utils
    assert len(COCO_CAT_IDS) == 80
    out.mkdir(parents=True, exist_ok=True)
    cats = [{"id": c, "name": f"cat{c}", "supercategory": "x"} for c in COCO_CAT_IDS]
    images = {"train": [(1, 48, 64), (2, 48, 64)], "val": [(3, 48, 64)]}
    m = np.zeros((48, 64), np.uint8, order="F")
    m[24:48, 32:64] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    anns = {
        "train": [
            # image 1: polygon of category 90 (contiguous 80) over the left half
            {"id": 1, "image_id": 1, "category_id": 90, "iscrowd": 0, "segmentation": [[0, 0, 32, 0, 32, 48, 0, 48]]},
            # image 1: compressed RLE of category 1 (contiguous 1) bottom right
            {"id": 2, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": rle},
            # image 2: a crowd region (must not be painted) and a polygon of category 13 (contiguous 12)
            {"id": 3, "image_id": 2, "category_id": 5, "iscrowd": 1, "segmentation": rle},
            {"id": 4, "image_id": 2, "category_id": 13, "iscrowd": 0, "segmentation": [[0, 0, 64, 0, 64, 20, 0, 20]]},
            # image 2: polygons of two points and of one (real COCO has a few): skipped and listed, never fatal
            {"id": 6, "image_id": 2, "category_id": 13, "iscrowd": 0, "segmentation": [[10, 30, 20, 40]]},
            {"id": 7, "image_id": 2, "category_id": 90, "iscrowd": 0, "segmentation": [[10, 30]]},
        ],
        "val": [{"id": 5, "image_id": 3, "category_id": 2, "iscrowd": 0, "segmentation": [[0, 0, 64, 0, 64, 48, 0, 48]]}],
    }
    if episodes is not None:
        images, anns, n = {"train": [], "val": []}, {"train": [], "val": []}, 0
        for split, items in zip(("train", "val"), episodes):
            for _, c in items:
                n += 1
                images[split].append((n, 64, 64))
                anns[split].append({"id": n, "image_id": n, "category_id": COCO_CAT_IDS[c - 1], "iscrowd": 0,
                                    "segmentation": [[0, 0, 64, 0, 64, 40, 0, 40]]})
    for split in ("train", "val"):
        with zipfile.ZipFile(out / f"{split}2014.zip", "w") as zf:
            for img_id, h, w in images[split]:
                zf.writestr(f"{split}2014/COCO_{split}2014_{img_id:012d}.jpg", _jpeg(h, w, img_id))
    with zipfile.ZipFile(out / "annotations_trainval2014.zip", "w") as zf:
        for split in ("train", "val"):
            doc = {"images": [{"id": i, "height": h, "width": w, "file_name": f"COCO_{split}2014_{i:012d}.jpg"}
                              for i, h, w in images[split]],
                   "annotations": [dict(a, area=1.0, bbox=[0, 0, 1, 1]) for a in anns[split]], "categories": cats}
            zf.writestr(f"annotations/instances_{split}2014.json", json.dumps(doc))
    return {f.name: md5(f) for f in out.iterdir()}


class ArchiveServer:
    """Serves a directory on 127.0.0.1 with Range support; ``cut_after`` truncates the next response."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.cut_after: int | None = None
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                path = server.directory / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = 0
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_after is not None:
                    body, server.cut_after = body[:server.cut_after], None
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.connection.close()
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
