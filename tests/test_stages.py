import importlib
from pathlib import Path

import yaml

from tuneline.stages import stage_names

REPO = Path(__file__).resolve().parents[1]


def _outs(spec: dict) -> list[str]:
    return [o if isinstance(o, str) else next(iter(o)) for o in spec.get("outs", []) + spec.get("metrics", [])]


def test_stage_list_is_the_pipeline_in_a_valid_order():
    names = stage_names(REPO / "dvc.yaml")
    assert names == ["prepare", "tokenize", "train", "evaluate", "register"]
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    producer = {out: names.index(name) for name in names for out in _outs(stages[name])}
    for i, name in enumerate(names):
        spec = stages[name]
        # whatever a stage reads from another stage was produced earlier in the list
        assert all(producer[d] < i for d in spec["deps"] if d in producer), name
        # each stage runs its own component and depends on that source file
        assert spec["cmd"] == f"python -m tuneline.stages {name}"
        assert f"components/{name}.py" in spec["deps"]
        assert callable(importlib.import_module(f"components.{name}").run)
