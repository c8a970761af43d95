"""`dvc repro` never misses a change: each stage's deps in dvc.yaml are derived from its
imports (tuneline/deps.py), its params are the ones it reads, and stages sit on the
library without importing each other."""

import ast
import json
import sys
from pathlib import Path

import pytest
import yaml

from tuneline import deps
from tuneline.config import Params, flatten
from tuneline.stages import stage_names

REPO = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "tokenize", "train", "validate", "evaluate", "register"]
FIX = "run `tuneline dvc-deps --write` (make deps) and commit dvc.yaml"


def _dvc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_dvc_yaml_matches_the_code():
    stale = deps.stale(REPO / "dvc.yaml")
    assert not stale, f"dvc.yaml disagrees with the code for: {stale}. Fix: {FIX}"


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_are_exactly_the_import_closure(stage):
    listed = {d for d in _dvc()[stage]["deps"] if d.endswith(".py")}
    assert listed == set(deps.stage_code(stage)), f"{stage}: {FIX}"


def test_the_closure_follows_lazy_imports_and_nothing_else():
    code = {s: set(deps.stage_code(s)) for s in STAGES}
    # register imports the card only inside the gate; tokenize packs; nobody runs the CLI
    assert [s for s in STAGES if "tuneline/card.py" in code[s]] == ["register"]
    assert [s for s in STAGES if "tuneline/packing.py" in code[s]] == [
        "tokenize",
        "train",
        "validate",
        "evaluate",
        "register",
    ]
    assert not [s for s in STAGES if any(p.startswith("tuneline/cli/") or p == "flows/pipeline.py" for p in code[s])]
    # evaluate's tokenizer code and the model loader: the deps that were missing by hand
    assert {"tuneline/tokenization.py", "tuneline/modeling.py"} <= code["evaluate"]


def test_the_closure_of_a_module_that_imports_lazily(tmp_path, monkeypatch):
    pkg = tmp_path / "tuneline"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from tuneline import b\n    return b\n")
    (pkg / "b.py").write_text("import os\nfrom tuneline.c import X\n")
    (pkg / "c.py").write_text("X = 1\n")
    (pkg / "d.py").write_text("")
    monkeypatch.setattr(deps, "CODE_ROOT", tmp_path)
    assert deps.closure.__wrapped__("tuneline.a") == (
        "tuneline/__init__.py",
        "tuneline/a.py",
        "tuneline/b.py",
        "tuneline/c.py",
    )


def test_no_stage_imports_another():
    for stage in STAGES:
        tree = ast.parse((REPO / "components" / f"{stage}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {
            f"{n.module}.{a.name}"
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module
            for a in n.names
        }
        assert not {m for m in imported if m.startswith("components")}, stage


def test_every_param_is_declared_by_a_stage_and_exists():
    declared = {p for s in STAGES for p in deps.component(s).PARAMS}
    assert declared == set(flatten(Params()))


@pytest.mark.parametrize("stage", STAGES)
def test_a_declared_param_is_read_by_the_stages_code(stage):
    """Each key a stage declares is read in its code (`.lr` or `cfg.lr`), so no stage
    re-runs for a key it never looks at. (That it declares every key it reads is checked
    at run time by test_tasks.py's toy task, which records the reads.)"""
    source = "\n".join((deps.CODE_ROOT / f).read_text() for f in deps.stage_code(stage))
    for key in deps.component(stage).PARAMS:
        leaf = key.split(".")[-1]
        assert f".{leaf}" in source, f"{stage} declares {key} but its code never reads .{leaf}"


def test_stage_outputs_are_read_only_after_they_are_made():
    names = stage_names(REPO / "dvc.yaml")
    assert names == STAGES
    made = {}
    for i, name in enumerate(names):
        comp = deps.component(name)
        for path in comp.INPUTS:
            assert made.get(path, 99) < i, f"{name} reads {path} before a stage makes it"
        made |= {p: i for p in comp.OUTS} | {deps.metrics_file(name): i}


@pytest.mark.slow
def test_editing_a_library_file_reruns_exactly_the_stages_that_import_it(built, tmp_path):
    """On a finished project, `dvc status` after an edit lists the stages whose code imports
    the edited file: packing.py -> tokenize and after; card.py -> register; the command line -> none."""
    from conftest import copy_project

    proj = copy_project(built, tmp_path / "proj")

    def status() -> set[str]:
        out = proj.run(sys.executable, "-m", "dvc", "status", "--json").stdout
        return set(json.loads(out or "{}"))

    assert status() == set()
    for rel, expected in [
        ("tuneline/packing.py", {"tokenize", "train", "validate", "evaluate", "register"}),
        ("tuneline/card.py", {"register"}),
        ("tuneline/cli/pipeline.py", set()),
        ("tuneline/splits.py", {"prepare", "validate", "evaluate", "register"}),
    ]:
        path = proj.root / rel
        before = path.read_text()
        path.write_text(before + "\n# an edit\n")
        assert status() == expected, rel
        assert expected == {s for s in STAGES if rel in deps.stage_code(s)}
        path.write_text(before)
    assert status() == set()


def test_a_stale_dvc_yaml_is_named_with_the_fix_and_rewritten(tmp_path):
    import subprocess

    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    spec["stages"]["train"]["deps"].remove("tuneline/packing.py")  # a dep kept by hand, forgotten
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert deps.stale(tmp_path / "dvc.yaml") == ["train"]
    cli = [sys.executable, "-m", "tuneline.cli", "dvc-deps"]
    proc = subprocess.run(cli, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "for: train" in proc.stderr and "tuneline dvc-deps --write" in proc.stderr
    subprocess.run([*cli, "--write"], cwd=tmp_path, check=True, capture_output=True, timeout=120)
    assert (
        deps.stale(tmp_path / "dvc.yaml") == []
        and (tmp_path / "dvc.yaml").read_text() == (REPO / "dvc.yaml").read_text()
    )
