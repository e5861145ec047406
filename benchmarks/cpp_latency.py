"""C++ (cpp/, svf_fss_predict) against Python on the same AOTInductor package, the same episode, one run.

    python benchmarks/cpp_latency.py [--model-dir models/fold0/1shot] [--runs 30]

Model: the median time of one model call (batch 1, 1 shot) in each language. End to end: per query,
reading the query, preprocessing the query and the supports, the model, mapping the mask back and
writing the PNG (serving.predict's steps in Python). Builds cpp/ into build/cpp first if needed.
Prints both, and the ratios C++ / Python.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build() -> Path:
    b = ROOT / "build" / "cpp"
    cmake = Path(sys.executable).parent / "cmake"
    subprocess.run([str(cmake), "-S", str(ROOT / "cpp"), "-B", str(b), f"-DPython3_EXECUTABLE={sys.executable}"],
                   check=True, capture_output=True)
    subprocess.run([str(cmake), "--build", str(b), "-j2"], check=True, capture_output=True)
    return b / "svf_fss_predict"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="models/fold0/1shot")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    from export.aoti import SIZE_KEY, load
    from pipeline.data.synthetic import generate_image
    from serving.inputs import mask_of, png_bytes, query_tensor, read_image, read_mask, support_tensors
    package = Path(args.model_dir) / "aoti" / "model.pt2"
    if not package.exists():
        sys.exit(f"{package} is missing: run `make repro` (the export stage writes it when export.aoti is true)")
    program = build()
    runner, meta = load(package)
    size = int(meta[SIZE_KEY])
    tmp = Path(tempfile.mkdtemp(prefix="cpp-bench-"))
    for i, name in ((0, "support"), (1, "query")):
        img, lab = generate_image(i, "val", 2 * size, 5)
        cls = int(next(c for c in np.unique(lab) if c not in (0, 255)))
        Image.fromarray(img).save(tmp / f"{name}.png")
        Image.fromarray(np.where(lab == cls, 255, 0).astype(np.uint8)).save(tmp / f"{name}_mask.png")
    s, m, q = tmp / "support.png", tmp / "support_mask.png", tmp / "query.png"

    r = subprocess.run([str(program), "--model", str(package), "--support", str(s), "--mask", str(m), "--out",
                        str(tmp / "cpp"), "--repeat", str(args.runs), "--query", *[str(q)] * args.runs],
                       capture_output=True, text=True, check=True)
    cpp_e2e = float(re.search(r"end to end median ([\d.]+) ms", r.stdout).group(1))
    cpp_model = float(re.search(r"model median ([\d.]+) ms", r.stdout).group(1))

    simg = read_image(s.read_bytes(), "s", 1 << 26)
    smask = read_mask(m.read_bytes(), "m", simg.shape[:2], 1 << 26)

    def end_to_end():
        img = read_image(q.read_bytes(), "q", 1 << 26)
        sup = [torch.from_numpy(a) for a in support_tensors([simg], [smask], size)]
        x, valid = query_tensor(img, size)
        with torch.no_grad():
            logits = runner(torch.from_numpy(x), *sup).numpy()
        (tmp / "py.png").write_bytes(png_bytes(mask_of(logits[0], valid, img.shape[:2]) * 255))

    def timed(fn, n):
        fn()
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            ts.append(1000 * (time.perf_counter() - t))
        return statistics.median(ts)

    sup = [torch.from_numpy(a) for a in support_tensors([simg], [smask], size)]
    x = torch.from_numpy(query_tensor(read_image(q.read_bytes(), "q", 1 << 26), size)[0])
    with torch.no_grad():
        py_model = timed(lambda: runner(x, *sup), args.runs)
    py_e2e = timed(end_to_end, args.runs)
    same = (np.array(Image.open(tmp / "py.png")) == np.array(Image.open(tmp / "cpp" / "query.png"))).mean()
    print(f"AOTInductor package {package} ({meta.get('AOTI_DEVICE_KEY')}, input {size}x{size}), query "
          f"{2 * size}x{2 * size}, 1 shot, {args.runs} runs, torch threads {torch.get_num_threads()}")
    print(f"{'':12}{'C++ ms':>10}{'Python ms':>12}{'C++/Python':>12}")
    print(f"{'model':12}{cpp_model:10.2f}{py_model:12.2f}{cpp_model / py_model:12.2f}")
    print(f"{'end to end':12}{cpp_e2e:10.2f}{py_e2e:12.2f}{cpp_e2e / py_e2e:12.2f}")
    print(f"masks equal on {100 * same:.2f}% of pixels")


if __name__ == "__main__":
    main()
