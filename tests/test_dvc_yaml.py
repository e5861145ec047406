"""dvc.yaml against the code: every stage depends on every project file it imports, and on `validate`."""
import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "export", "serving")


def module_file(name: str) -> Path | None:
    p = ROOT.joinpath(*name.split("."))
    if (p / "__init__.py").exists():
        return p / "__init__.py"
    return p.with_suffix(".py") if p.with_suffix(".py").exists() else None


def imported_modules(path: Path, module: str) -> set[str]:
    """Project modules named by the file's imports, also those inside functions; relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}   # `from pkg import module`
    return {m for m in found if m.split(".")[0] in PACKAGES}


def import_closure(module: str) -> set[Path]:
    """Every project file that running ``python -m module`` executes, parents' __init__ included."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        m = todo.pop()
        f = module_file(m)
        if f is None or m in seen:
            continue
        seen[m] = f
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += imported_modules(f, m)
    return set(seen.values())


def stages() -> dict[str, dict]:
    """dvc.yaml's stages, foreach groups taken once with their template body."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: body.get("do", body) for name, body in spec.items()}


def dep_paths(body: dict) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else d for d in body.get("deps", [])]


def out_paths(body: dict) -> list[str]:
    paths = []
    for key in ("outs", "metrics", "plots"):
        paths += [next(iter(o)) if isinstance(o, dict) else o for o in body.get(key, [])]
    return paths


@pytest.mark.parametrize("name", list(stages()))
def test_stage_depends_on_all_code_it_runs(name):
    body = stages()[name]
    module = re.search(r"python -m ([\w.]+)", body["cmd"]).group(1)
    deps = [d.rstrip("/") for d in dep_paths(body)]
    uncovered = sorted(str(f.relative_to(ROOT)) for f in import_closure(module)
                       if f.stat().st_size > 0   # empty __init__.py files run no code
                       and not any(str(f.relative_to(ROOT)) == d or str(f.relative_to(ROOT)).startswith(d + "/")
                                   for d in deps))
    assert not uncovered, f"stage {name} runs {uncovered} but dvc.yaml does not list them in its deps"


def test_closure_sees_function_level_and_relative_imports():
    files = {str(f.relative_to(ROOT)) for f in import_closure("stages.train")}
    # pipeline/train.py imports `.evaluate` relatively; stages/train.py imports checkpoint_path inside main()
    assert {"pipeline/train.py", "pipeline/evaluate.py", "pipeline/data/episodes.py", "pipeline/adapter.py",
            "pipeline/config.py", "stages/train.py", "stages/common.py"} <= files


def test_every_stage_runs_after_validate():
    st = stages()
    producer = {o.split("${")[0].rstrip("/"): n for n, b in st.items() for o in out_paths(b)}

    def upstream(name, seen=()):
        found = set()
        for d in dep_paths(st[name]):
            d = d.split("${")[0].rstrip("/")
            for out, n in producer.items():
                if n != name and n not in seen and (d == out or d.startswith(out + "/") or out.startswith(d + "/")):
                    found |= {n} | upstream(n, seen + (name,))
        return found

    assert "params.yaml" in dep_paths(st["validate"])
    late = [n for n in st if n != "validate" and "validate" not in upstream(n)]
    assert not late, f"stages {late} can run before params.yaml is validated"


def test_one_training_stage_per_fold_and_shot_count(tmp_path):
    import shutil
    import subprocess
    import sys
    dvc = str(Path(sys.executable).parent / "dvc")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["split"]["folds"], params["train"]["shots"] = [0, 2], [1, 5]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    listed = subprocess.run([dvc, "stage", "list", "--name-only"], cwd=tmp_path, capture_output=True, text=True,
                            check=True).stdout.split()
    for stage in ("train", "evaluate", "merge", "export"):
        assert {n for n in listed if n.startswith(stage + "@")} == {f"{stage}@{f}-{k}" for f in (0, 2) for k in (1, 5)}
    assert {n for n in listed if n.startswith("report@")} == {"report@0", "report@2"}
    assert {n for n in listed if n.startswith("base@")} == {"base@0", "base@2"}   # BAM's base learner: one per fold
