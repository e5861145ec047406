"""The C++ library and command line (cpp/): built with CMake, run on fixed episodes, compared with Python.

Same backend (the AOTInductor package through LibTorch): masks identical to serving.predict's.
Another backend (ONNX Runtime in Python): at least 99.9% of pixels equal.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.synthetic import generate_image

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUILD = ROOT / "build" / "cpp"        # kept between runs: a rebuild after a change takes seconds
SIZE = 48
CMAKE = shutil.which("cmake", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(CMAKE is None or CXX is None,
                                reason=f"the C++ test needs CMake and a C++ compiler (cmake: {CMAKE}, c++: {CXX})")


CCACHE = shutil.which("ccache")      # optional: with it a fresh clone's build reuses the objects of earlier ones


@pytest.fixture(scope="module")
def program():
    # CCACHE_BASEDIR: paths under the checkout (its .venv's LibTorch headers) hash relative to it, so an unchanged
    # cpp/ compiles from the cache in any clone (77 s of compiling on 2 cores without it)
    env = dict(os.environ, CCACHE_BASEDIR=str(ROOT))
    launcher = [f"-DCMAKE_CXX_COMPILER_LAUNCHER={CCACHE}"] if CCACHE else []
    configure = subprocess.run([CMAKE, "-S", str(ROOT / "cpp"), "-B", str(BUILD), f"-DPython3_EXECUTABLE={sys.executable}",
                                *launcher], capture_output=True, text=True, env=env)
    if configure.returncode != 0 and "Could NOT find PNG" in configure.stdout + configure.stderr:
        pytest.skip("libpng's headers are missing (Debian: libpng-dev)")
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    assert "TensorRT backend skipped" in configure.stdout or "TensorRT backend:" in configure.stdout
    build = subprocess.run([CMAKE, "--build", str(BUILD), "-j", str(os.cpu_count() or 2)], capture_output=True, text=True,
                           env=env)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    return BUILD / "svf_fss_predict"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small merged model exported as the export stage does it: AOTInductor package and ONNX graphs."""
    from conftest import small_merged_model
    from export.onnx_export import _example, export_split
    from stages.export import aoti_package
    d = tmp_path_factory.mktemp("cpp_model")
    merged, cfg = small_merged_model("resnet10_slim", SIZE, export={"aoti": True})
    q, s, m = _example(SIZE)
    with torch.no_grad():   # the untrained model calls everything one class: centre its decision on these inputs
        margin = (lambda o: (o[:, 1] - o[:, 0]).median())(merged(q, s, m))
        last = [c for c in merged.modules() if isinstance(c, torch.nn.Conv2d) and c.out_channels == 2][-1]
        last.bias[1] -= margin
    report = aoti_package(cfg, merged, d / "aoti", SIZE, {"head": "pfenet"}, [(q, s, m), (q[:1], s[:1, :1], m[:1, :1])],
                          (q[:1], s[:1, :1], m[:1, :1]))
    assert report["built"] and report["max_rel"] <= 1e-4
    from export.aoti import load
    runner, _ = load(d / "aoti" / "model.pt2")
    with torch.no_grad():       # a channels-last query (torchvision's resize of an HWC image) reads right
        got = runner(q.to(memory_format=torch.channels_last), s.transpose(-1, -2).contiguous().transpose(-1, -2), m)
        assert torch.allclose(got, merged(q, s, m), rtol=0, atol=1e-4)
    export_split(merged, d, SIZE, 18, {"input_size": [SIZE, SIZE]}, "torchscript")
    return d


@pytest.fixture(scope="module")
def episodes(tmp_path_factory):
    d = tmp_path_factory.mktemp("cpp_images")
    files = []
    for i in range(5):
        img, lab = generate_image(i, "val", 60, 11)
        cls = int(next(c for c in np.unique(lab) if c not in (0, 255)))
        m = np.where(lab == cls, 255, 0).astype(np.uint8)
        if i == 4:                                  # another size and aspect than the model's input
            Image.fromarray(img).resize((90, 70), Image.BILINEAR).save(d / f"img{i}.png")
        else:
            Image.fromarray(img).save(d / f"img{i}.png")
        Image.fromarray(m).save(d / f"mask{i}.png")
        files.append((d / f"img{i}.png", d / f"mask{i}.png"))
    Image.open(files[3][0]).save(d / "img3.jpg", quality=90)
    Image.open(files[2][0]).convert("CMYK").save(d / "cmyk.jpg", quality=90)     # Adobe's inverted CMYK, as Pillow writes
    return files, d / "img3.jpg"


def _run(program, model, supports, masks, queries, out, *extra):
    cmd = [str(program), "--model", str(model), "--out", str(out), *extra]
    for i in range(max(len(supports), len(masks))):
        cmd += ["--support", str(supports[i])] if i < len(supports) else []
        cmd += ["--mask", str(masks[i])] if i < len(masks) else []
    return subprocess.run(cmd + ["--query", *map(str, queries)], capture_output=True, text=True, timeout=300)


def test_cpp_masks_equal_python(program, model_dir, episodes, tmp_path):
    from serving.predict import predict
    files, jpeg = episodes
    queries = [files[0][0], files[4][0], jpeg, jpeg.with_name("cmyk.jpg")]
    for shots in (1, 2):
        supports, masks = [f[0] for f in files[1:1 + shots]], [f[1] for f in files[1:1 + shots]]
        out = tmp_path / f"cpp{shots}"
        r = _run(program, model_dir / "aoti" / "model.pt2", supports, masks, queries, out, "--repeat", "2")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"{shots} shots, backend aoti (cpu), input {SIZE}x{SIZE}" in r.stdout and "model median" in r.stdout
        fractions = []
        for backend, agree in (("aoti", 1.0), ("onnxruntime", 0.999)):
            py = tmp_path / f"{backend}{shots}"
            predict(model_dir, supports, masks, queries, py, backend=backend, overlays=False, progress=False)
            for q in queries:
                got = np.array(Image.open(out / f"{q.stem}.png"))
                want = np.array(Image.open(py / f"{q.stem}.png"))
                assert got.shape == want.shape == np.array(Image.open(q)).shape[:2]
                assert set(np.unique(got)) <= {0, 255}
                same = (got == want).mean()
                assert same >= agree, f"{q.name}, {shots} shots, {backend}: {same:.5f} of pixels equal"
                fractions.append(want.mean() / 255)
        assert 0.05 < np.mean(fractions) < 0.95, fractions      # masks with both classes: the comparison bites


def test_cpp_bad_inputs_say_what_is_wrong(program, model_dir, episodes, tmp_path):
    files, _ = episodes
    (s, m), (q, _) = files[1], files[0]
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((60, 60), 128, np.uint8)).save(grey)
    small = tmp_path / "small.png"
    Image.fromarray(np.pad(np.full((10, 10), 255, np.uint8), 10)).save(small)
    model = model_dir / "aoti" / "model.pt2"
    cases = [((model, [s], [grey], [q]), 1, "is not binary: it holds values [128]"),
             ((model, [s], [small], [q]), 1, "mask 1 is 30x30 but its image is 60x60"),
             ((model, [s], [m], [tmp_path / "none.png"]), 1, "none.png: cannot open"),
             ((model, [s], [s], [q]), 1, "is not binary"),
             ((tmp_path / "missing.pt2", [s], [m], [q]), 2, "does not exist; the export stage writes it"),
             ((model, [s, s], [m], [q]), 2, "2 --support but 1 --mask"),
             ((model_dir / "query_decoder.onnx", [s], [m], [q]), 2, "is an ONNX graph; this program runs"),
             ((s, [s], [m], [q]), 1, "is not an AOTInductor package that loads here")]
    for args, code, message in cases:
        r = _run(program, *args, tmp_path / "out")
        assert r.returncode == code and message in r.stderr, (message, r.returncode, r.stderr)
        assert "frame #" not in r.stderr                      # a sentence, not LibTorch's backtrace
    r = _run(program, model, [s], [grey], [q], tmp_path / "out", "--mask-threshold", "0.4")
    assert r.returncode == 0, r.stderr                       # a threshold binarises it, as in Python


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares width x height (its data a few bytes): a decompression bomb's shape."""
    import struct
    import zlib

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_cpp_writes_every_mask_or_none_and_refuses_hostile_files(program, model_dir, episodes, tmp_path):
    """As serving.predict: a truncated JPEG, a PNG declaring 65535 x 65535, a BMP, a missing query among good ones,
    two queries of one name, a full disk: each one line and exit 1 (2 for the command line), and --out holds
    every mask or none. Numbers on the command line are whole and in range."""
    import subprocess as sp
    files, jpg = episodes
    (s, m), (q, _), (q2, _) = files[1], files[0], files[2]
    model = model_dir / "aoti" / "model.pt2"
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(jpg.read_bytes()[: jpg.stat().st_size * 2 // 3])
    bmp = tmp_path / "q.bmp"
    Image.open(q).save(bmp)
    twin = tmp_path / "twin" / q.name
    twin.parent.mkdir()
    twin.write_bytes(q.read_bytes())
    out = tmp_path / "out"
    cases = [([q, cut, q2], 1, "cut.jpg: not a readable JPEG"),
             ([q, _png_declaring(tmp_path / "bomb.png", 65535, 65535)], 1, "declares 65535x65535 = 4294836225 pixels"),
             ([q, bmp], 1, "q.bmp: neither a PNG nor a JPEG"),
             ([q, tmp_path / "none.png", q2], 1, "none.png: cannot open"),
             ([q, twin], 2, f"two queries are named {q.stem}")]
    for queries, code, message in cases:
        r = _run(program, model, [s], [m], queries, out)
        assert r.returncode == code and message in r.stderr, (message, r.returncode, r.stderr)
        assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())     # nothing half-done
    for flag, value in (("--repeat", "99999999999"), ("--mask-threshold", "1e999"), ("--mask-threshold", "0.5abc"),
                        ("--mask-threshold", "-1"), ("--size", "12x"), ("--threads", "0"), ("--threads", "two")):
        r = _run(program, model, [s], [m], [q], out, flag, value)
        assert r.returncode == 2 and f"{flag} needs a" in r.stderr and "terminate" not in r.stderr, (flag, r.stderr)
    # a full disk: a 16 KiB tmpfs (root only; elsewhere this part is left out)
    small = tmp_path / "small"
    small.mkdir()
    if sp.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(small)], capture_output=True).returncode == 0:
        try:
            many = []
            for i in range(12):
                many.append(tmp_path / f"many{i}.png")
                many[-1].write_bytes(q.read_bytes())
            r = _run(program, model, [s], [m], many, small / "out")
            assert r.returncode == 1 and ("No space left on device" in r.stderr or "cannot write" in r.stderr), r.stderr
            assert not list((small / "out").glob("*.png")) and not list((small / "out").glob(".*")), r.stderr
        finally:
            sp.run(["umount", str(small)], capture_output=True)


def test_cpp_keeps_every_earlier_mask_when_an_output_name_is_a_folder(program, model_dir, episodes, tmp_path):
    """Every mask or none against the masks of an earlier run: a folder where one mask would go refuses the run,
    naming the folder, before any earlier mask is replaced (and nothing temporary is left)."""
    files, _ = episodes
    model, out, queries = model_dir / "aoti" / "model.pt2", tmp_path / "out", [files[i][0] for i in (0, 1, 4)]
    assert _run(program, model, [files[3][0]], [files[3][1]], queries, out).returncode == 0
    folder = out / f"{queries[2].stem}.png"
    folder.unlink()
    folder.mkdir()
    before = {f.name: f.read_bytes() for f in out.glob("*.png") if f.is_file()}
    r = _run(program, model, [files[2][0]], [files[2][1]], queries, out)        # another support: other masks
    assert r.returncode == 1 and f"{folder} is a folder" in r.stderr, r.stderr
    assert {f.name: f.read_bytes() for f in out.glob("*.png") if f.is_file()} == before and folder.is_dir()
    assert not list(out.glob(".*")), list(out.glob(".*"))


def _png(path: Path, a: np.ndarray, depth: int, color: int, damage: str = "") -> Path:
    """``a`` as a PNG of that bit depth and colour type, written chunk by chunk: a tEXt chunk, then the image data
    with the zlib stream's 4-byte checksum in an IDAT chunk of its own (where an encoder that splits its data at a
    fixed size may leave it; both libraries reach it after the last row). ``damage``: "crc" flips a bit of the
    image data's CRC, "adler" of the zlib checksum, "text" of the tEXt chunk's CRC."""
    import struct
    import zlib

    def chunk(tag, data, bad=False):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) ^ bad)
    rows = a.astype(">u2" if depth == 16 else np.uint8).reshape(len(a), -1)
    if depth < 8:                               # 8 // depth values a byte, the first in the high bits
        rows = np.packbits(np.unpackbits(rows[..., None], axis=-1)[..., 8 - depth:].reshape(len(a), -1), axis=1)
    z = zlib.compress(b"".join(b"\0" + r.tobytes() for r in rows))
    z = z[:-1] + bytes([z[-1] ^ (damage == "adler")])
    header = struct.pack(">IIBBBBB", a.shape[1], len(a), depth, color, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"tEXt", b"Comment\0test", damage == "text")
                     + chunk(b"IDAT", z[:-4], damage == "crc") + chunk(b"IDAT", z[-4:]) + chunk(b"IEND", b""))
    return path


def test_cpp_and_python_decide_alike_on_unusual_pngs(program, model_dir, episodes, tmp_path):
    """The same files through serving.predict and svf_fss_predict: equal masks, or both refuse naming the file.
    2- and 4-bit grey masks are read as Pillow reads them, scaled to 0..255 (0/3 is black and white, 0/255; 0/1 is
    black and dark grey, 0/85, not binary); a 16-bit grey+alpha query by its high byte (Pillow's); a wrong CRC (of
    the image data or of a chunk before it) or zlib checksum refuses the file."""
    from serving.inputs import UserError
    from serving.predict import predict
    files, _ = episodes
    (s, m), (q, _) = files[1], files[0]
    obj, rgb = np.array(Image.open(m)) // 255, np.array(Image.open(q))
    grey = np.array(Image.open(q).convert("L")).astype(np.uint16)
    la16 = np.stack([grey * 256, np.full_like(grey, 65535)], -1)   # scaled by 65535, the greys over 128 lose one
    cases = [(_png(tmp_path / "mask2bit.png", obj * 3, 2, 0), q, True),
             (_png(tmp_path / "mask4bit.png", obj * 15, 4, 0), q, True),
             (_png(tmp_path / "mask2bit01.png", obj, 2, 0), q, False),
             (m, _png(tmp_path / "grey_alpha16.png", la16, 16, 4), True),
             (m, _png(tmp_path / "bad_idat_crc.png", rgb, 8, 2, "crc"), False),
             (_png(tmp_path / "mask_bad_adler.png", obj * 255, 8, 0, "adler"), q, False),
             (m, _png(tmp_path / "bad_adler.png", rgb, 8, 2, "adler"), False),
             (m, _png(tmp_path / "bad_text_crc.png", rgb, 8, 2, "text"), False)]
    wrong = []
    for i, (mask, query, accepted) in enumerate(cases):
        named = query if mask == m else mask
        r = _run(program, model_dir / "aoti" / "model.pt2", [s], [mask], [query], tmp_path / f"cpp{i}")
        try:
            predict(model_dir, [s], [mask], [query], tmp_path / f"py{i}", backend="aoti", overlays=False,
                    progress=False)
            py = np.array(Image.open(tmp_path / f"py{i}" / f"{query.stem}.png"))
        except UserError as e:
            py = str(e)
        if accepted and (r.returncode or isinstance(py, str)):
            wrong.append((named.name, "refused", r.stderr, py if isinstance(py, str) else "accepted"))
        elif accepted and not np.array_equal(np.array(Image.open(tmp_path / f"cpp{i}" / f"{query.stem}.png")), py):
            wrong.append((named.name, "masks differ"))
        elif not accepted and not (r.returncode == 1 and str(named) in r.stderr and str(named) in str(py)):
            wrong.append((named.name, "not refused by both", r.stderr, py if isinstance(py, str) else "accepted"))
    assert not wrong, wrong


def test_cpp_uses_the_cores_others_leave_free(program, model_dir, episodes, tmp_path):
    """--threads auto (the default): with every core kept busy by other processes the program runs on one
    thread (LibTorch's default of one busy-waiting thread per core collapsed there, benchmarks/contention.py);
    --threads N is obeyed as given."""
    files, _ = episodes
    s, m = files[0]
    queries = [files[i][0] for i in (1, 2, 3)]
    cores = len(os.sched_getaffinity(0))
    spin = "import time\nt = time.time()\nwhile time.time() - t < 120: pass\n"
    busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(cores + 1)]
    try:
        time.sleep(0.5)
        r = _run(program, model_dir / "aoti" / "model.pt2", [s], [m], queries, tmp_path / "busy")
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert r.returncode == 0 and r.stdout.rstrip().endswith("threads auto 1"), r.stdout + r.stderr
    r = _run(program, model_dir / "aoti" / "model.pt2", [s], [m], queries, tmp_path / "fixed", "--threads", "2")
    assert r.returncode == 0 and r.stdout.rstrip().endswith("threads 2"), r.stdout + r.stderr
