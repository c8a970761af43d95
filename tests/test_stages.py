import importlib
from pathlib import Path

import yaml

from tuneline.stages import stage_names

REPO = Path(__file__).resolve().parents[1]


def _outs(spec: dict) -> list[str]:
    return [o if isinstance(o, str) else next(iter(o)) for o in spec.get("outs", []) + spec.get("metrics", [])]


def test_stage_list_is_the_pipeline_in_a_valid_order():
    names = stage_names(REPO / "dvc.yaml")
    assert names == ["prepare", "tokenize", "train", "validate", "evaluate", "register"]
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


def test_dvc_plots_show_renders_the_training_curves(tmp_path, model_cache):
    """`dvc plots show` on the train stage's CSV (as components/train.py writes it) draws
    train_loss and val_loss against step, and no second plot of the same file."""
    import json
    import sys

    from conftest import make_project

    proj = make_project(tmp_path / "proj", model_cache)
    (proj.root / "plots").mkdir()
    (proj.root / "plots/train.csv").write_text(
        "step,train_loss,val_loss,lr\n1,2.5,,0.001\n2,2.0,1.9,0.001\n3,1.5,,0.0005\n4,1.2,1.1,0.0001\n"
    )
    out = json.loads(proj.run(sys.executable, "-m", "dvc", "plots", "show", "--json").stdout)
    (plots,) = out["data"].values()  # the top-level definition only: no stage-level duplicate
    (plot,) = plots
    content = plot["content"]
    assert content["encoding"]["x"]["field"] == "step"
    series = {}
    for point in content["data"]["values"]:
        if point["dvc_inferred_y_value"] != "":
            series.setdefault(point["field"], []).append((int(point["step"]), float(point["dvc_inferred_y_value"])))
    assert series == {"train_loss": [(1, 2.5), (2, 2.0), (3, 1.5), (4, 1.2)], "val_loss": [(2, 1.9), (4, 1.1)]}
