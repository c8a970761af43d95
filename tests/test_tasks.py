"""A task is one `Task`: a toy task defined here, and nowhere else, runs through all five
stages; and each stage reads only the params it declares (what its DVC deps list)."""

from __future__ import annotations

import contextlib
import json
import sys

import pytest

from tuneline import deps, scoring, tasks
from tuneline.config import Params, _Group
from tuneline.params_file import parse_params

pytestmark = pytest.mark.slow

STAGES = ["prepare", "tokenize", "train", "validate", "evaluate", "register"]

# Upper-casing: the answer is the input in capitals. Nothing about it exists outside this file.
UPPER = tasks.Task(
    "upper",
    ("text", "target"),
    ("target",),
    ("text",),
    prompt=lambda r, _: f"Upper: {r['text']}\nAnswer:",
    answer=lambda r: " " + r["target"],
    metrics=("exact_match", "perplexity"),
    score=lambda metric, rows, ev, labels: scoring.mean(
        [tasks.normalise(o) == tasks.normalise(r["target"]) for o, r in zip(ev["outputs"], rows)]
    ),
    fill=lambda r, rng: r | {"target": r["target"] or r["text"].upper()},
    serve_fields=("text",),
    serve_example="hello world",
    use="Upper-case a short text.",
    limits="A toy for tests.",
)


class Reads:
    """Records which params the code reads: `group.key` for every field of a params group
    read through attribute access. Reads by MLflow bookkeeping (tracking.py: the run's
    experiment, the logged copy of every param) do not count: they change no output."""

    def __init__(self, params: Params):
        self.names = {
            id(getattr(params, g)): g for g in type(params).model_fields if isinstance(getattr(params, g), _Group)
        } | {id(params): ""}
        self.seen: set[str] = set()

    def __call__(self, obj, name):
        value = object.__getattribute__(obj, name)
        group = self.names.get(id(obj))
        if group is not None and name in type(obj).model_fields and not isinstance(value, _Group):
            caller = sys._getframe(2).f_code  # past the bound function that calls this
            if not caller.co_filename.endswith(("tracking.py",)) and caller.co_name not in ("walk",):
                self.seen.add(f"{group}.{name}" if group else name)
        return value


def test_a_task_defined_in_a_test_runs_through_every_stage(tmp_path, monkeypatch, model_cache):
    monkeypatch.setitem(tasks.TASKS, "upper", UPPER)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("TUNELINE_PARENT_RUN_ID", raising=False)
    words = ["river", "stone", "light", "garden", "window", "paper", "silver", "market", "winter", "forest"]
    rows = [{"text": f"{a} {b} {c}"} for a in words for b in words[:4] for c in words[:2]]  # 80 rows
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = parse_params(
        {
            "model": {"name": "tiny-gpt2"},
            "prepare": {
                "task": "upper",
                "source": str(tmp_path / "rows.jsonl"),
                "n_train": 48,
                "n_val": 8,
                "n_test": 8,
                "near_dup_threshold": None,  # three words from one small vocabulary: all alike
            },
            "tokenize": {"max_length": 64},
            "train": {"max_steps": 2, "eval_every": 2, "log_every": 1, "batch_size": 4},
            "evaluate": {"batch_size": 8, "max_new_tokens": 8},
            "register": {"model_name": "upper-toy", "experiment": "toy"},
        }
    )
    from tuneline.stages import run_stage

    reads = {}
    with contextlib.chdir(tmp_path):
        for stage in STAGES:
            recorder = Reads(params)
            _Group.__getattribute__ = lambda obj, name, rec=recorder: rec(obj, name)  # a function binds
            try:
                metrics = run_stage(stage, params)
            finally:
                del _Group.__getattribute__  # back to pydantic's own
            reads[stage] = recorder.seen
            assert metrics is not None, stage

    evals = json.loads((tmp_path / "metrics/eval.json").read_text())
    assert set(evals["tuned"]) >= {"exact_match", "perplexity"} and evals["n_examples"] == 8
    assert json.loads((tmp_path / "metrics/register.json").read_text())["version"] == 1
    predictions = [json.loads(line) for line in (tmp_path / "reports/predictions.jsonl").read_text().splitlines()]
    assert predictions[0]["prompt"].startswith("Upper: ") and predictions[0]["target"].isupper()
    # every param a stage read is one it declares, so `dvc repro` re-runs it when one changes
    for stage in STAGES:
        undeclared = reads[stage] - set(deps.component(stage).PARAMS)
        assert not undeclared, f"{stage} reads {sorted(undeclared)} but does not declare them"
    assert reads["train"] >= {"train.lr", "train.batch_size", "seed"}
