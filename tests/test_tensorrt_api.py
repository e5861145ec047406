"""The TensorRT builder and runtime, checked statically against TensorRT 10.13's API stubs.

Neither TensorRT nor a GPU exists where the tests run, so export/tensorrt_engine.py never executes
here; basedpyright with the `tensorrt-stubs` package (installed without its dependencies from
requirements-stubs.lock) flags a misspelt, removed or wrongly called API instead.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYRIGHT = Path(sys.executable).parent / "basedpyright"


def check(*files: Path, cwd: Path = ROOT) -> dict:
    if not PYRIGHT.exists():
        pytest.skip("basedpyright is not installed (it comes with the dev extra: make test installs it)")
    # --project: this repository's [tool.basedpyright], never a configuration found in a parent folder
    r = subprocess.run([str(PYRIGHT), "--outputjson", "--project", str(ROOT / "pyproject.toml"), "--pythonpath",
                        sys.executable, *map(str, files)], cwd=cwd,
                       capture_output=True, text=True, timeout=300)
    return json.loads(r.stdout)


def errors(report: dict) -> list[str]:
    return [f"{Path(d['file']).name}:{d['range']['start']['line'] + 1}: {d['message']}"
            for d in report["generalDiagnostics"] if d["severity"] == "error"]


def test_stubs_are_the_ones_checked_against_and_stay_out_of_the_runtime():
    typings = Path(sys.prefix) / "typings"       # [tool.basedpyright] stubPath; the Makefile installs them there
    if not PYRIGHT.exists():
        pytest.skip("basedpyright is not installed (it comes with the dev extra: make test installs it)")
    assert [p.name for p in typings.glob("tensorrt_stubs-*.dist-info")] == ["tensorrt_stubs-10.13.0.35.1.dist-info"]
    assert (typings / "tensorrt" / "__init__.pyi").exists()
    from export.tensorrt_engine import unavailable_reason
    assert "not installed" in unavailable_reason()   # the stubs do not make `import tensorrt` look installed


def test_tensorrt_code_uses_the_documented_api():
    report = check()                        # [tool.basedpyright] in pyproject.toml: export/tensorrt_engine.py
    assert report["summary"]["filesAnalyzed"] >= 1
    assert not errors(report), "\n".join(errors(report))


def test_a_wrong_call_is_flagged(tmp_path):
    bad = tmp_path / "old_api.py"
    bad.write_text("import tensorrt as trt\n\n"
                   "builder = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
                   "config = builder.create_builder_config()\n"
                   "config.max_workspace_size = 1 << 30\n"             # removed in TensorRT 10
                   "engine = builder.build_engine(None, config)\n")    # removed in TensorRT 10
    found = errors(check(bad))
    assert any("max_workspace_size" in e for e in found) and any("build_engine" in e for e in found), found
