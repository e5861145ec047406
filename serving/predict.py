"""Segment your images without a server: the support set is encoded once, then every query is decoded.

    python -m serving.predict --support s1.jpg --mask m1.png [--support s2.jpg --mask m2.png ...] \
        --query q1.jpg q2.jpg | --query folder/ --out predictions/ [--model-dir models/fold0/1shot] \
        [--backend auto|tensorrt|openvino|openvino-int8|onnxruntime|aoti|torch] [--format png|rle] [--no-overlay] [--mask-threshold 0.5] \
        [--gt labels/]

Writes, per query, <out>/<name>.png (0 background, 255 object, at the query's resolution) or, with
--format rle, one <out>/masks.json (COCO RLE per query), and <out>/<name>_overlay.png (the query
with the mask filled translucent cyan and outlined). Images and masks are read as the service reads
them (serving/inputs.py). Everything is written to a temporary folder first and moved into <out> at
the end: a failure leaves <out> as it was.

With --gt, a folder of the queries' true masks (<name>.png, 0/1 with 255 ignore or 0/255 with 255 object,
as a support mask, but it may be empty), the predictions are scored as the benchmarks score episodes: the
class's IoU (intersections and unions summed over the queries), FB-IoU, each query's IoU; <out>/val.json
holds them with the worst queries first and the rule each truth was read by (also printed), and
<out>/val.png shows the worst four (truth and prediction).

With --format labelstudio, <out>/labelstudio.json holds one Label Studio task per query, its image at
--image-url + the query's path percent-encoded, and the prediction as brush regions (one per class; the
class is --class's name, "object" without): import it into a project whose config has
<BrushLabels name="tag" toName="image">.

Many classes at once: ``--class cat --support c1.jpg --mask c1.png --class dog --support d1.jpg --mask d1.png``
(each --class's supports are its shots). Every query then gets one label map, <out>/<name>.png as a palette
PNG (0 background, i the i-th class; serving/labelmap.py), <out>/classes.json names the ids; with --gt the
true masks are label maps with the same ids (255 ignore) and val.json has each class's IoU and their mean
(one --class: its truths are masks, read as without --class).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import urllib.parse
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data.folder import IMAGE_SUFFIXES
from pipeline.figures import overlay

from .backends import load_backend
from .threads import share_fairly
from .labelstudio import brush_results
from .labelmap import (check_background_threshold, check_classes, color, label_json, label_map, label_overlay,
                       label_png, read_label_map, same_name, score_labels)
from .model_files import CHOICES, missing_model
from .inputs import UserError, check_threshold, mask_of, png_bytes, query_tensor, read_image, read_mask, \
    read_truth_mask, rle, support_tensors

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


def read_truth(data: bytes, what: str, shape: tuple[int, int], n: int, threshold: float | None = None):
    """A query's truth and the rule that read it. One class (with or without --class): a support mask's rules (0/1
    with 255 ignore, or 0/255 with 255 object; --mask-threshold binarises others), but it may be empty. Several
    classes: a label map (0 background, 1..n the classes, 255 ignore); one that holds only 255 is refused (nothing
    to score), one of only 0 and 255 is read so (no class pixel: a query without the classes, or a 0/255 mask whose
    object would be ignored) under a rule of its own, with a warning."""
    if n == 1:
        return read_truth_mask(data, what, shape, MAX_PIXELS, threshold,
                               hint="--mask-threshold (e.g. 0.5) to binarise a JPEG or anti-aliased mask")
    m = read_label_map(data, what, shape, n, MAX_PIXELS)
    values = set(np.unique(m).tolist())
    if values == {255}:
        raise UserError(f"{what} holds only the value 255 (ignore): nothing in it can be scored")
    if values == {0, 255}:
        log.warning("%s holds only 0 and 255: read as a label map, 255 ignore, so no pixel of it is a class; if it is a "
                    "0/255 mask, write its class id (1..%d, in the order of --class) instead of 255", what, n)
        return m, "label map of 0 and 255 only: no class pixel, 255 ignore"
    return m, f"label map: 0 background, 1..{n} the classes, 255 ignore"


def task_url(prefix: str, path: Path) -> str:
    """A Label Studio task's image: ``prefix`` + the path percent-encoded (all but '/'), so that a name with '#',
    '&', '+', '%', '?' or a space still names its file: in the default prefix the path is the value of the
    query parameter ``d``, in an http prefix part of the URL's path; the server decodes either back."""
    return prefix + urllib.parse.quote(path.as_posix(), safe="/")


def val_summary(rows: list[dict], names: list[str] | None = None) -> dict:
    """Each class's IoU and FB-IoU pooled over the queries (the protocol's way), their mean (mIoU), the mean
    of the per-query IoU, how many truths each rule read, and every query from the worst. One class: ``iou``
    is its IoU."""
    def pooled(i, u):
        return 100 * i / u if u else 100.0
    inter, union = (sum(np.atleast_1d(r[k]) for r in rows) for k in ("intersection", "union"))
    per_class = [pooled(i, u) for i, u in zip(inter.tolist(), union.tolist())]
    n = len(per_class)
    fg = pooled(sum(r["fg_intersection"] for r in rows), sum(r["fg_union"] for r in rows))
    bg = pooled(sum(r["bg_intersection"] for r in rows), sum(r["bg_union"] for r in rows))
    out = {"queries": len(rows), "iou": round(sum(per_class) / n, 2), "fbiou": round((fg + bg) / 2, 2),
           "mean_query_iou": round(100 * sum(r["iou"] for r in rows) / len(rows), 2),
           "truth": dict(Counter(r["truth"] for r in rows))}
    if names:
        out = {**out, "miou": out["iou"], "per_class": {c: round(v, 2) for c, v in zip(names, per_class)}}
    return {**out, "per_query": sorted(rows, key=lambda r: (r["iou"], r["query"]))}


def val_figure(path: Path, worst: list[tuple], n: int = 1) -> None:
    """The worst queries: truth (green; classes in their colours) and prediction (cyan) side by side, with their
    IoU."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(worst), 2, figsize=(6, 3 * len(worst)), squeeze=False)
    for (name, iou, img, mask, truth), (a, b) in zip(worst, axes):
        a.imshow(overlay(img, (truth == 1).astype(np.uint8), color=(0, 200, 0)) if n == 1 else
                 label_overlay(img, np.where(truth == 255, 0, truth), n))
        a.set_title(f"{name}: truth", fontsize=9)
        b.imshow(overlay(img, mask) if n == 1 else label_overlay(img, mask, n))
        b.set_title(f"prediction, IoU {100 * iou:.1f}", fontsize=9)
        for ax in (a, b):
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def support_version(supports, masks, classes) -> str:
    """The model version stamped on Label Studio pre-annotations: a digest of the support images and masks (and
    their classes), so that two imports made from other examples can be told apart, and one made again cannot."""
    h = hashlib.sha256()
    for i, (s, m) in enumerate(zip(supports, masks)):
        h.update(json.dumps(classes[i] if classes else None).encode())
        h.update(hashlib.sha256(Path(s).read_bytes()).digest() + hashlib.sha256(Path(m).read_bytes()).digest())
    return f"svf-fss-file-{h.hexdigest()[:10]}"


def check_truths(gt: Path, queries: list[Path]) -> Path:
    """The --gt folder, refused unless it holds <query name>.png for every query."""
    if not gt.is_dir():
        raise UserError(f"--gt {gt} is not a folder; it holds the queries' true masks, <query name>.png")
    missing = [q.name for q in queries if not (gt / f"{q.stem}.png").is_file()]
    if missing:
        raise UserError(f"--gt {gt} has no mask for {len(missing)} quer{'y' if len(missing) == 1 else 'ies'}: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (expected <query name>.png)")
    return gt


def predict(model_dir, supports, masks, queries, out, backend: str = "auto", fmt: str = "png",
            overlays: bool = True, mask_threshold: float | None = None, progress: bool = True,
            gt: str | Path | None = None, classes: list[str] | None = None, background_threshold: float = 0.5,
            image_url: str = "/data/local-files/?d=", ls_names: tuple[str, str] = ("tag", "image")) -> dict:
    """Segment every query against the support set; returns {query name: foreground area}. With ``gt`` (a
    folder of the queries' true masks), also scores them into <out>/val.json and <out>/val.png. With
    ``classes`` (the class of each support, same order), every query gets one label map of those classes
    (serving/labelmap.py) instead of a mask."""
    if len(supports) != len(masks) or not supports:
        raise UserError(f"{len(supports)} support image(s) and {len(masks)} mask(s): give one mask per support, "
                        "at least one")
    check_threshold(mask_threshold)
    names = None
    if classes is not None:
        if len(classes) != len(supports):
            raise UserError(f"{len(supports)} supports but {len(classes)} class names")
        names = check_classes(list(dict.fromkeys(classes)))
        check_background_threshold(background_threshold)
    problem = missing_model(Path(model_dir), backend)
    if problem:
        raise UserError(problem)
    queries = list_queries([str(q) for q in queries])
    gt = None if gt is None else check_truths(Path(gt), queries)
    b = load_backend(model_dir, backend)
    groups = [[i for i, c in enumerate(classes) if c == n] for n in names] if names else [list(range(len(supports)))]
    feats = []
    version = support_version(supports, masks, classes)
    for g, pick in enumerate(groups):
        if b.shots and len(pick) != b.shots:
            raise UserError(f"{len(pick)} shots given{f' for class {names[g]!r}' if names else ''}; this model (BAM "
                            f"trained with {b.shots} shots) takes exactly {b.shots}")
        images, ms = [], []
        for i in pick:
            s, m = supports[i], masks[i]
            img = read_image(Path(s).read_bytes(), f"support {i + 1} ({s})", MAX_PIXELS)
            images.append(img)
            ms.append(read_mask(Path(m).read_bytes(), f"mask {i + 1} ({m})", img.shape[:2], MAX_PIXELS,
                                mask_threshold))
        feats.append(b.encode(*support_tensors(images, ms, b.size)))
    n = len(feats)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    areas, rles, rows, worst = {}, [], [], []
    try:
        for q in tqdm(queries, desc=f"segment ({b.name})", unit="img", disable=not progress):
            img = read_image(q.read_bytes(), f"query {q}", MAX_PIXELS)
            x, valid = query_tensor(img, b.size)
            if b.cpu_torch:
                share_fairly(torch)
            logits = [b.decode(x, f)[0] for f in feats]
            mask = (label_map(logits, valid, img.shape[:2], background_threshold) if names
                    else mask_of(logits[0], valid, img.shape[:2]))
            areas[q.stem] = int((mask > 0).sum())
            if gt is not None:
                f = gt / f"{q.stem}.png"
                what = f"the true {'label map' if n > 1 else 'mask'} of {q.name} ({f})"
                truth, rule = read_truth(f.read_bytes(), what, img.shape[:2], n, mask_threshold)
                r = score_labels(mask, truth, n)
                ious = [i / u for i, u in zip(*(np.atleast_1d(r[k]) for k in ("intersection", "union"))) if u]
                r = {"query": q.name, "iou": sum(ious) / len(ious) if ious else 1.0, "truth": rule, **r}
                rows.append(r)
                worst = sorted(worst + [(q.name, r["iou"], img, mask, truth)], key=lambda w: (w[1], w[0]))[:4]
            if fmt == "png":
                (tmp / f"{q.stem}.png").write_bytes(label_png(mask, n) if names else png_bytes(mask * 255))
            elif fmt == "labelstudio":
                rles.append({"data": {ls_names[1]: task_url(image_url, q)}, "predictions": [
                    {"model_version": version, "result": brush_results(mask, names or ["object"],
                                                                                     *ls_names)}]})
            elif names:
                rles.append({"file": q.name, **label_json(mask, names, background_threshold)})
            else:
                rles.append({"file": q.name, "height": img.shape[0], "width": img.shape[1], "area": areas[q.stem],
                             "rle": rle(mask)})
            if overlays:
                (tmp / f"{q.stem}_overlay.png").write_bytes(png_bytes(label_overlay(img, mask, n) if names
                                                                      else overlay(img, mask)))
        if fmt == "rle":
            (tmp / "masks.json").write_text(json.dumps({"backend": b.name, "masks": rles}, indent=1))
        if fmt == "labelstudio":
            (tmp / "labelstudio.json").write_text(json.dumps(rles))
        if names:
            (tmp / "classes.json").write_text(json.dumps({"classes": [{"id": i, "name": c, "color": color(i)}
                                                                      for i, c in enumerate(names, 1)],
                                                          "background_threshold": background_threshold}, indent=1))
        if gt is not None:
            (tmp / "val.json").write_text(json.dumps({"backend": b.name, "supports": [str(s) for s in supports],
                                                      **val_summary(rows, names)}, indent=1))
            val_figure(tmp / "val.png", worst, n)
        out.mkdir(exist_ok=True)
        made = sorted(tmp.iterdir())
        taken = [out / f.name for f in made if (out / f.name).is_dir()]
        if taken:            # every output or none: checked before the first one replaces anything
            raise UserError(f"{taken[0]} is a folder; the output of that name cannot replace it (nothing written)")
        for f in made:
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return areas


def no_shots(name: str) -> str:
    return (f"error: --class {name!r} has no --support after it: each class's supports and masks follow its "
            "--class (--class NAME --support IMG --mask MASK ...)\n")


class ClassAction(argparse.Action):
    """--support / --mask after a --class NAME belong to that class (the order of the command line)."""

    def __call__(self, parser, ns, value, option_string=None):
        if self.dest == "klass":
            if ns.klass is not None and ns.klass not in ns.support_class:
                parser.exit(2, no_shots(ns.klass))
            same = [c for c in dict.fromkeys(ns.support_class) if c is not None and same_name(c) == same_name(value)]
            if same:
                parser.exit(2, f"error: two classes are named {value!r}" + (f" and {same[0]!r} (the same up to case, "
                               "spaces or Unicode form)" if same[0] != value else "") + ": give each class one --class "
                               "and its shots after it\n")
            ns.klass = value
            return
        getattr(ns, self.dest).append(value)
        if self.dest == "support":
            ns.support_class.append(ns.klass)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m serving.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="models/fold0/1shot", help="folder with *.onnx / merged.pt / model.engine")
    ap.add_argument("--backend", default="auto", choices=("auto",) + CHOICES,
                    help="auto: TensorRT, else ONNX Runtime, else PyTorch (as the service)")
    ap.add_argument("--class", dest="klass", action=ClassAction, default=None, metavar="NAME",
                    help="the --support/--mask that follow belong to class NAME; with --class the outputs are label "
                    "maps (0 background, i the i-th class, classes.json names them)")
    ap.add_argument("--support", action=ClassAction, default=[], help="a support image (repeat for k shots)")
    ap.add_argument("--mask", action=ClassAction, default=[], help="its mask (repeat, same order)")
    ap.add_argument("--background-threshold", type=float, default=0.5, help="with --class: a pixel is background "
                    "unless some class's foreground probability is above this (default 0.5)")
    ap.add_argument("--query", nargs="+", required=True, help="query images and/or folders of them")
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--format", choices=("png", "rle", "labelstudio"), default="png",
                    help="masks as PNGs, one COCO RLE JSON, or labelstudio.json: tasks with brush pre-annotations "
                    "that Label Studio imports")
    ap.add_argument("--image-url", default="/data/local-files/?d=", help="with --format labelstudio: each task's "
                    "image is this prefix + the query's path as given (default: Label Studio's local files)")
    ap.add_argument("--ls-names", default="tag,image", help="with --format labelstudio: the BrushLabels and Image "
                    "names of the labelling config (default tag,image, Label Studio's template)")
    ap.add_argument("--no-overlay", action="store_true", help="do not write <name>_overlay.png")
    ap.add_argument("--mask-threshold", type=float, default=None,
                    help="binarise JPEG or anti-aliased masks: object at this fraction of white (0 < t < 1)")
    ap.add_argument("--gt", default=None, help="folder of the queries' true masks (<query name>.png): score the "
                    "predictions (IoU, FB-IoU, the worst queries) into <out>/val.json and val.png")
    ap.set_defaults(support_class=[])
    args = ap.parse_args(argv)
    if len(args.ls_names.split(",")) != 2 or not all(args.ls_names.split(",")):
        sys.exit(f"error: --ls-names {args.ls_names!r}: give the BrushLabels and the Image names, e.g. tag,image")
    if args.klass is not None and args.klass not in args.support_class:
        sys.exit(no_shots(args.klass).rstrip())
    if not args.support:
        ap.error("give at least one --support image with its --mask")
    classes = None
    if any(c is not None for c in args.support_class):
        if args.support_class[0] is None:
            sys.exit("error: with --class, every --support follows a --class NAME (the first one comes before any "
                     "--class)")
        classes = args.support_class
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        areas = predict(args.model_dir, args.support, args.mask, args.query, args.out, args.backend, args.format,
                        not args.no_overlay, args.mask_threshold, gt=args.gt, classes=classes,
                        background_threshold=args.background_threshold, image_url=args.image_url,
                        ls_names=tuple(args.ls_names.split(",")))
    except (UserError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    empty = [k for k, v in areas.items() if not v]
    print(f"{len(areas)} quer{'y' if len(areas) == 1 else 'ies'} segmented into {args.out}"
          + (f"; no object found in {len(empty)}: {', '.join(empty[:5])}" if empty else ""))
    if args.gt:
        v = json.loads((Path(args.out) / "val.json").read_text())
        worst = ", ".join(f"{r['query']} ({100 * r['iou']:.1f})" for r in v["per_query"][:3])
        per = "".join(f", {c} {x:.2f}" for c, x in v.get("per_class", {}).items())
        print("truth read as " + ", ".join(f"{rule} ({k} quer{'y' if k == 1 else 'ies'})"
                                           for rule, k in v["truth"].items()))
        print(f"val: {'mIoU' if 'miou' in v else 'IoU'} {v['iou']:.2f}{per}, FB-IoU {v['fbiou']:.2f}, mean per query {v['mean_query_iou']:.2f} over "
              f"{v['queries']} queries; worst: {worst} -> {Path(args.out) / 'val.json'}, {Path(args.out) / 'val.png'}")


if __name__ == "__main__":
    main()
