"""Segment your images without a server: the support set is encoded once, then every query is decoded.

    python -m serving.predict --support s1.jpg --mask m1.png [--support s2.jpg --mask m2.png ...] \
        --query q1.jpg q2.jpg | --query folder/ --out predictions/ [--model-dir models/fold0/1shot] \
        [--backend auto|tensorrt|onnxruntime|aoti|torch] [--format png|rle] [--no-overlay] [--mask-threshold 0.5] \
        [--gt labels/]

Writes, per query, <out>/<name>.png (0 background, 255 object, at the query's resolution) or, with
--format rle, one <out>/masks.json (COCO RLE per query), and <out>/<name>_overlay.png (the query
with the mask filled translucent cyan and outlined). Images and masks are read as the service reads
them (serving/inputs.py). Everything is written to a temporary folder first and moved into <out> at
the end: a failure leaves <out> as it was.

With --gt, a folder of the queries' true masks (<name>.png, 0/1 with 255 ignore or 0/255, as a support
mask, but it may be empty), the predictions are scored as the benchmarks score episodes: the class's IoU
(intersections and unions summed over the queries), FB-IoU, each query's IoU; <out>/val.json holds them
with the worst queries first, and <out>/val.png shows the worst four (truth and prediction).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.data.folder import IMAGE_SUFFIXES
from pipeline.figures import overlay

from .backends import load_backend
from .model_files import BACKENDS, missing_model
from .inputs import UserError, check_threshold, mask_of, png_bytes, query_tensor, read_image, read_mask, rle, \
    support_tensors

log = logging.getLogger("serving.predict")
MAX_PIXELS = 8192 * 8192


def list_queries(paths: list[str]) -> list[Path]:
    """The query files: files as given, folders' images (other files skipped with a warning naming them)."""
    out, skipped, dangling = [], [], []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    skipped.append(f)
                else:
                    (out if f.is_file() else dangling).append(f)
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"query {p} does not exist")

    def names(files):
        return ", ".join(f.name for f in files[:10]) + (" ..." if len(files) > 10 else "")
    if skipped:
        log.warning("skipped %d file(s) that are not .jpg/.jpeg/.png: %s", len(skipped), names(skipped))
    if dangling:
        log.warning("skipped %d image name(s) that lead to no file (a link to nothing, a link loop, a folder): %s",
                    len(dangling), names(dangling))
    stems = {}
    for f in out:
        if f.stem in stems:
            raise UserError(f"queries {stems[f.stem]} and {f} would write the same output name {f.stem!r}")
        stems[f.stem] = f
    if not out:
        raise UserError(f"no query image in {', '.join(paths)}")
    return out


def score(pred, truth) -> dict:
    """Intersection and union of a 0/1 prediction against a 0/1/255 truth (255 ignored), object and background."""
    ok = truth != 255
    p, t = pred.astype(bool)[ok], truth[ok] == 1
    return {"intersection": int((p & t).sum()), "union": int((p | t).sum()), "bg_intersection": int((~p & ~t).sum()),
            "bg_union": int((~p | ~t).sum()), "truth_pixels": int(t.sum()), "predicted_pixels": int(p.sum())}


def val_summary(rows: list[dict]) -> dict:
    """The class's IoU and FB-IoU pooled over the queries (the protocol's way), the mean of the per-query IoU,
    and every query from the worst."""
    total = {k: sum(r[k] for r in rows) for k in ("intersection", "union", "bg_intersection", "bg_union")}
    iou = total["intersection"] / total["union"] if total["union"] else 1.0
    bg = total["bg_intersection"] / total["bg_union"] if total["bg_union"] else 1.0
    return {"queries": len(rows), "iou": round(100 * iou, 2), "fbiou": round(100 * (iou + bg) / 2, 2),
            "mean_query_iou": round(100 * sum(r["iou"] for r in rows) / len(rows), 2),
            "per_query": sorted(rows, key=lambda r: (r["iou"], r["query"]))}


def val_figure(path: Path, worst: list[tuple]) -> None:
    """The worst queries: truth (green) and prediction (cyan) side by side, with their IoU."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(worst), 2, figsize=(6, 3 * len(worst)), squeeze=False)
    for (name, iou, img, mask, truth), (a, b) in zip(worst, axes):
        a.imshow(overlay(img, (truth == 1).astype(np.uint8), color=(0, 200, 0)))
        a.set_title(f"{name}: truth", fontsize=9)
        b.imshow(overlay(img, mask))
        b.set_title(f"prediction, IoU {100 * iou:.1f}", fontsize=9)
        for ax in (a, b):
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def predict(model_dir, supports, masks, queries, out, backend: str = "auto", fmt: str = "png",
            overlays: bool = True, mask_threshold: float | None = None, progress: bool = True,
            gt: str | Path | None = None) -> dict:
    """Segment every query against the support set; returns {query name: foreground area}. With ``gt`` (a
    folder of the queries' true masks), also scores them into <out>/val.json and <out>/val.png."""
    if len(supports) != len(masks) or not supports:
        raise UserError(f"{len(supports)} support image(s) and {len(masks)} mask(s): give one mask per support, "
                        "at least one")
    check_threshold(mask_threshold)
    problem = missing_model(Path(model_dir), backend)
    if problem:
        raise UserError(problem)
    queries = list_queries([str(q) for q in queries])
    if gt is not None:
        gt = Path(gt)
        if not gt.is_dir():
            raise UserError(f"--gt {gt} is not a folder; it holds the queries' true masks, <query name>.png")
        missing = [q.name for q in queries if not (gt / f"{q.stem}.png").is_file()]
        if missing:
            raise UserError(f"--gt {gt} has no mask for {len(missing)} quer{'y' if len(missing) == 1 else 'ies'}: "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (expected <query name>.png)")
    b = load_backend(model_dir, backend)
    if b.shots and len(supports) != b.shots:
        raise UserError(f"{len(supports)} shots given; this model (BAM trained with {b.shots} shots) takes exactly "
                        f"{b.shots}")
    images, ms = [], []
    for i, (s, m) in enumerate(zip(supports, masks)):
        img = read_image(Path(s).read_bytes(), f"support {i + 1} ({s})", MAX_PIXELS)
        images.append(img)
        ms.append(read_mask(Path(m).read_bytes(), f"mask {i + 1} ({m})", img.shape[:2], MAX_PIXELS, mask_threshold))
    feats = b.encode(*support_tensors(images, ms, b.size))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    areas, rles, rows, worst = {}, [], [], []
    try:
        for q in tqdm(queries, desc=f"segment ({b.name})", unit="img", disable=not progress):
            img = read_image(q.read_bytes(), f"query {q}", MAX_PIXELS)
            x, valid = query_tensor(img, b.size)
            mask = mask_of(b.decode(x, feats)[0], valid, img.shape[:2])
            areas[q.stem] = int(mask.sum())
            if gt is not None:
                f = gt / f"{q.stem}.png"
                truth = read_mask(f.read_bytes(), f"the true mask of {q.name} ({f})", img.shape[:2], MAX_PIXELS,
                                  mask_threshold, need_object=False)
                r = score(mask, truth)
                r = {"query": q.name, "iou": r["intersection"] / r["union"] if r["union"] else 1.0, **r}
                rows.append(r)
                worst = sorted(worst + [(q.name, r["iou"], img, mask, truth)], key=lambda w: (w[1], w[0]))[:4]
            if fmt == "png":
                (tmp / f"{q.stem}.png").write_bytes(png_bytes(mask * 255))
            else:
                rles.append({"file": q.name, "height": img.shape[0], "width": img.shape[1], "area": areas[q.stem],
                             "rle": rle(mask)})
            if overlays:
                (tmp / f"{q.stem}_overlay.png").write_bytes(png_bytes(overlay(img, mask)))
        if fmt == "rle":
            (tmp / "masks.json").write_text(json.dumps({"backend": b.name, "masks": rles}, indent=1))
        if gt is not None:
            (tmp / "val.json").write_text(json.dumps({"backend": b.name, "supports": [str(s) for s in supports],
                                                      **val_summary(rows)}, indent=1))
            val_figure(tmp / "val.png", worst)
        out.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return areas


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m serving.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="models/fold0/1shot", help="folder with *.onnx / merged.pt / model.engine")
    ap.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS,
                    help="auto: TensorRT, else ONNX Runtime, else PyTorch (as the service)")
    ap.add_argument("--support", action="append", required=True, help="a support image (repeat for k shots)")
    ap.add_argument("--mask", action="append", required=True, help="its mask (repeat, same order)")
    ap.add_argument("--query", nargs="+", required=True, help="query images and/or folders of them")
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--format", choices=("png", "rle"), default="png", help="masks as PNGs or one COCO RLE JSON")
    ap.add_argument("--no-overlay", action="store_true", help="do not write <name>_overlay.png")
    ap.add_argument("--mask-threshold", type=float, default=None,
                    help="binarise JPEG or anti-aliased masks: object at this fraction of white (0 < t < 1)")
    ap.add_argument("--gt", default=None, help="folder of the queries' true masks (<query name>.png): score the "
                    "predictions (IoU, FB-IoU, the worst queries) into <out>/val.json and val.png")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        areas = predict(args.model_dir, args.support, args.mask, args.query, args.out, args.backend, args.format,
                        not args.no_overlay, args.mask_threshold, gt=args.gt)
    except (UserError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    empty = [k for k, v in areas.items() if not v]
    print(f"{len(areas)} quer{'y' if len(areas) == 1 else 'ies'} segmented into {args.out}"
          + (f"; no object found in {len(empty)}: {', '.join(empty[:5])}" if empty else ""))
    if args.gt:
        v = json.loads((Path(args.out) / "val.json").read_text())
        worst = ", ".join(f"{r['query']} ({100 * r['iou']:.1f})" for r in v["per_query"][:3])
        print(f"val: IoU {v['iou']:.2f}, FB-IoU {v['fbiou']:.2f}, mean per query {v['mean_query_iou']:.2f} over "
              f"{v['queries']} queries; worst: {worst} -> {Path(args.out) / 'val.json'}, {Path(args.out) / 'val.png'}")


if __name__ == "__main__":
    main()
