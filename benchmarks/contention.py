"""The C++ program and `serving.predict --backend aoti` on a CPU that other work keeps busy, per thread setting.

    python benchmarks/contention.py [--model-dir models/fold0/1shot] [--queries 40] [--settings default,one,...]

Runs 40 queries (1 shot) end to end, wall clock of the whole command (median and worst of --runs), on an idle CPU and beside two kinds of
neighbours: as many pure-Python spinning processes as cores ("spinners"), and one PyTorch process running
small convolutions on all cores with its own OpenMP threads ("torch"), twice as many spinners as cores
("2x spin"), and both ("torch+spin"). Thread settings:
  default   what the programs choose by themselves: the cores other processes leave free, per query
            (cpp/src/threads.cpp, serving/threads.py)
  all       OpenMP threads = cores, busy-waiting as LibTorch's defaults do (GOMP_SPINCOUNT unset, 300k spins)
  one       OMP_NUM_THREADS=1
  passive   OMP_WAIT_POLICY=PASSIVE (threads sleep at once at a barrier)
  spin10k   GOMP_SPINCOUNT=10000 (spin about 10 us at a barrier, then sleep); spin100k likewise
The package is models/<...>/aoti/model.pt2 when `make cpp` made one, else a random model of params.yaml's
defaults exported once into svf-contention/ in the temporary folder (timing does not depend on the weights). Prints seconds per
run and each setting's ratio to its idle time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path(tempfile.gettempdir()) / "svf-contention"
TORCH_NEIGHBOUR = ("import torch, time\nx = torch.randn(1, 32, 48, 48); c = torch.nn.Conv2d(32, 32, 3, padding=1)\n"
                   "t = time.time()\nwith torch.no_grad():\n    while time.time() - t < 3600: c(x)\n")
SPINNER = "import time\nt = time.time()\nwhile time.time() - t < 3600: pass\n"
SETTINGS = {"default": {}, "all": {"OMP_NUM_THREADS": str(os.cpu_count())}, "one": {"OMP_NUM_THREADS": "1"},
            "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin10k": {"GOMP_SPINCOUNT": "10000"},
            "spin100k": {"GOMP_SPINCOUNT": "100000"}}


def package(model_dir: Path) -> Path:
    p = model_dir / "aoti" / "model.pt2"
    if p.exists():
        return p
    p = CACHE / "model.pt2"
    if p.exists():
        return p
    print(f"no {model_dir}/aoti/model.pt2 (`make cpp` writes it): exporting a random model of params.yaml's defaults "
          f"to {p} once", flush=True)
    import torch
    from export.aoti import export_aoti
    from pipeline.config import load_config
    from pipeline.models import build_model
    from pipeline.svf import merge_svf
    import yaml
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["pretrained"] = "random"
    cfg = load_config(params)
    model, _ = build_model(cfg)
    with torch.no_grad():
        merged = merge_svf(model).eval()
    CACHE.mkdir(exist_ok=True)
    return export_aoti(merged, p, cfg.eval.test_size, {})


def files(n: int, size: int) -> tuple[Path, Path, list[Path]]:
    from pipeline.data.synthetic import generate_image
    d = CACHE / f"images{size}"
    d.mkdir(parents=True, exist_ok=True)
    qs = []
    for i in range(n + 1):
        img, lab = generate_image(i, "val", size, 5)
        Image.fromarray(img).save(d / f"q{i}.png")
        if i == 0:
            cls = int(next(c for c in np.unique(lab) if c not in (0, 255)))
            Image.fromarray(np.where(lab == cls, 255, 0).astype(np.uint8)).save(d / "mask.png")
        else:
            qs.append(d / f"q{i}.png")
    return d / "q0.png", d / "mask.png", qs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="models/fold0/1shot")
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--settings", default="default,all,one")
    ap.add_argument("--loads", default="idle,spinners,2x spin,torch,torch+spin")
    ap.add_argument("--programs", default="cpp,python")
    ap.add_argument("--runs", type=int, default=3, help="runs of each (median and worst printed)")
    args = ap.parse_args()
    from export.aoti import SIZE_KEY, load
    pt2 = package(Path(args.model_dir))
    size = int(load(pt2)[1][SIZE_KEY])
    s, m, qs = files(args.queries, 2 * size)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cpp_latency import build
    program = build()
    cores = len(os.sched_getaffinity(0))
    out = Path(tempfile.mkdtemp(prefix="contention-"))
    model_dir = out / "model"        # serving.predict's aoti backend reads <dir>/aoti/model.pt2
    (model_dir / "aoti").mkdir(parents=True)
    os.symlink(pt2.resolve(), model_dir / "aoti" / "model.pt2")
    commands = {"cpp": [str(program), "--model", str(pt2), "--support", str(s), "--mask", str(m), "--out",
                        str(out / "cpp"), "--query", *map(str, qs)],
                "python": [sys.executable, "-m", "serving.predict", "--model-dir", str(model_dir), "--backend", "aoti",
                           "--support", str(s), "--mask", str(m), "--out", str(out / "py"), "--no-overlay", "--query",
                           *map(str, qs)]}
    loads = {"idle": [], "spinners": [SPINNER] * cores, "2x spin": [SPINNER] * (2 * cores),
             "torch": [TORCH_NEIGHBOUR], "torch+spin": [TORCH_NEIGHBOUR] + [SPINNER] * cores}
    print(f"{args.queries} queries {2 * size}x{2 * size}, model input {size}, {cores} cores; seconds per run "
          "(ratio to the same setting idle)")
    results: dict = {}
    for load_name in args.loads.split(","):
        scripts = loads[load_name]
        neighbours = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL) for code in scripts]
        try:
            time.sleep(1.0 if neighbours else 0)
            for prog in args.programs.split(","):
                for setting in args.settings.split(","):
                    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
                    env.update(SETTINGS[setting], PYTHONPATH=str(ROOT))
                    times = []
                    for _ in range(args.runs):
                        t = time.perf_counter()
                        r = subprocess.run(commands[prog], env=env, capture_output=True, text=True, timeout=900,
                                           cwd=ROOT)
                        times.append(time.perf_counter() - t)
                        if r.returncode:
                            sys.exit(f"{prog} failed: {r.stderr[-2000:]}")
                    took = statistics.median(times)
                    results[load_name, prog, setting] = took
                    base = results.get(("idle", prog, setting), took)
                    print(f"{load_name:10} {prog:7} {setting:8} median {took:6.2f} s  x{took / base:5.2f}   worst "
                          f"{max(times):6.2f} s  x{max(times) / base:5.2f}", flush=True)
        finally:
            for p in neighbours:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
