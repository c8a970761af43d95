"""Sweeps: the spec, every arm validated before anything runs, and the winner chosen on the
validation split with the number of arms accounted for (tuneline/sweep.py)."""

import numpy as np
import pytest

from tuneline import recipes, scoring, sweep
from tuneline.config import parse_params
from tuneline.errors import TunelineError

DEFAULTS = parse_params({})


def test_a_grid_is_the_product_of_its_axes_in_order():
    grid = sweep.parse_grid(["train.lr=1e-4,5e-4,2e-3", "train.lora_r=8,16"], DEFAULTS)
    arms = sweep.arms(grid)
    assert len(arms) == 6 and arms[0] == {"train.lr": 1e-4, "train.lora_r": 8} and arms[-1]["train.lr"] == 2e-3


@pytest.mark.parametrize(
    "items, message",
    [
        (["train.lrr=1,2"], r"unknown param 'train.lrr'.*did you mean 'train.lr'"),
        (["train.lr="], r"has no values"),
        (["train.lr=,"], r"has no values"),
        (["train.lr"], r"is not key=values"),
        (["train.lr=1e-4", "train.lr=2e-4"], r"gives 'train.lr' twice"),
        (["train.lr=1e-4,1e-4"], r"repeats a value"),
    ],
)
def test_a_bad_grid_is_one_clear_line(items, message):
    with pytest.raises(TunelineError, match=message) as e:
        sweep.parse_grid(items, DEFAULTS)
    assert "\n" not in str(e.value) and "Fix:" in str(e.value)


def test_an_invalid_value_in_one_arm_names_that_arm_before_anything_runs():
    arms = sweep.arms(sweep.parse_grid(["train.lr=1e-3,-1"], DEFAULTS))
    with pytest.raises(TunelineError, match=r"sweep arm 2 \(train.lr=-1\): .*train.lr") as e:
        sweep.validate(lambda sets: recipes.build("descramble", ["model.name=tiny-gpt2", *sets]), arms)
    assert "\n" not in str(e.value)


def test_valid_arms_give_each_arms_params():
    arms = sweep.arms(sweep.parse_grid(["train.lr=1e-3,2e-3"], DEFAULTS))
    params = sweep.validate(lambda sets: recipes.build("descramble", list(sets)), arms)
    assert [p.train.lr for p in params] == [1e-3, 2e-3]


def test_a_seeded_sample_is_reproducible_and_stays_in_its_ranges():
    ranges = sweep.parse_ranges(["train.lr=1e-5:1e-3", "train.lora_r=8,16,32"], DEFAULTS)
    a, b = sweep.arms({}, ranges, 8, seed=3), sweep.arms({}, ranges, 8, seed=3)
    assert a == b and len(a) == 8 and len({repr(x) for x in a}) == 8
    assert all(1e-5 <= x["train.lr"] <= 1e-3 and x["train.lora_r"] in (8, 16, 32) for x in a)
    assert a != sweep.arms({}, ranges, 8, seed=4)


@pytest.mark.parametrize("item", ["train.lr=1e-3:1e-5", "train.lr=a:b", "train.lr="])
def test_a_bad_range_is_one_clear_line(item):
    with pytest.raises(TunelineError, match="--range"):
        sweep.parse_ranges([item], DEFAULTS)


def test_nothing_to_sweep_and_both_kinds_at_once_are_refused():
    with pytest.raises(TunelineError, match="nothing to sweep"):
        sweep.arms({})
    with pytest.raises(TunelineError, match="not both"):
        sweep.arms({"train.lr": [1]}, sweep.parse_ranges(["train.lora_r=8,16"], DEFAULTS), 2)


def _arm(p, n=200, seed=0):
    """One arm's per-example 0/1 outcomes on the same n validation examples."""
    return scoring.mean(np.random.default_rng(seed).random(n) < p)


def test_the_winner_is_the_best_arm_and_a_clear_one_beats_every_other_after_holm():
    stats = [_arm(0.5, seed=1), _arm(0.9, seed=2), _arm(0.45, seed=3)]
    sel = sweep.select(stats, "accuracy", n_boot=2000)
    assert sel.winner == 1 and sel.comparisons[1] is None and sel.clear()


def test_a_winner_within_noise_of_another_is_not_called_clear():
    stats = [_arm(0.70, seed=1), _arm(0.71, seed=2), _arm(0.3, seed=3)]
    sel = sweep.select(stats, "accuracy", n_boot=2000)
    assert sel.winner in (0, 1) and not sel.clear() and sel.beaten[2]


@pytest.mark.parametrize(
    "pvalues, beaten",
    [
        ([0.03, 0.04], [False, False]),  # each below 0.05 alone; Holm needs 0.025 for the smaller
        ([0.02, 0.04], [True, True]),  # 0.02 <= 0.025, then 0.04 <= 0.05
        ([0.04, 0.02], [True, True]),  # order does not matter
        ([0.02, 0.06], [True, False]),
    ],
)
def test_holm_over_the_arms_with_known_p_values(monkeypatch, pvalues, beaten):
    ps = iter(pvalues)

    def fake_compare(a, b, metric, test, n_boot):
        return scoring.Comparison(metric, 1.0, 0.5, 0.5, 0.1, 0.9, next(ps), test, 10)

    monkeypatch.setattr(scoring, "compare", fake_compare)
    stats = [_arm(0.9, seed=1), _arm(0.5, seed=2), _arm(0.5, seed=3)]
    sel = sweep.select(stats, "accuracy", alpha=0.05)
    assert sel.winner == 0 and sel.beaten == [False, *beaten] and sel.clear() == all(beaten)


def test_lower_is_better_metrics_pick_the_lowest():
    stats = [scoring.mean(np.full(50, 3.0)), scoring.mean(np.full(50, 2.0))]
    assert sweep.select(stats, "unterminated_rate", n_boot=200).winner == 1


@pytest.mark.slow
def test_arms_run_as_dvc_experiments_and_an_unchanged_stage_runs_once(tmp_path, monkeypatch):
    """A toy two-stage pipeline: the first stage does not read the swept param."""
    import json
    import os
    import subprocess
    import sys

    # DVC's queue worker is started as `dvc` from PATH: the venv's, as `make` gives it.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])

    dvc = (sys.executable, "-m", "dvc")
    git = ("git", "-c", "user.name=t", "-c", "user.email=t@t")
    (tmp_path / "params.yaml").write_text("a: 1\nb: 2\n")
    (tmp_path / "one.py").write_text(
        "import json, yaml\np = yaml.safe_load(open('params.yaml'))\njson.dump({'x': p['a']}, open('one.json', 'w'))\n"
    )
    (tmp_path / "two.py").write_text(
        "import json, yaml\np = yaml.safe_load(open('params.yaml'))\n"
        "json.dump({'y': json.load(open('one.json'))['x'] * p['b']}, open('m.json', 'w'))\n"
    )
    (tmp_path / "dvc.yaml").write_text(
        f"stages:\n  one:\n    cmd: {sys.executable} one.py\n    deps: [one.py]\n    params: [a]\n    outs: [one.json]\n"
        f"  two:\n    cmd: {sys.executable} two.py\n    deps: [two.py, one.json]\n    params: [b]\n"
        "    metrics: [{m.json: {cache: false}}]\n"
    )
    for cmd in (("git", "init", "-q"), (*dvc, "init", "-q"), (*dvc, "repro", "-q"), ("git", "add", "-A")):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    subprocess.run((*git, "commit", "-qm", "base"), cwd=tmp_path, check=True, capture_output=True)
    names = sweep.queue([{"b": 3}, {"b": 4}], cwd=tmp_path, dvc=dvc)
    status = sweep.run_queue(jobs=1, cwd=tmp_path, dvc=dvc, poll=1, timeout=300)
    assert status == {"sweep-1": "Success", "sweep-2": "Success"} and names == ["sweep-1", "sweep-2"]
    shown = json.loads(
        subprocess.run((*dvc, "exp", "show", "--json"), cwd=tmp_path, capture_output=True, text=True).stdout
    )
    ys = {
        e["name"]: e["data"]["metrics"]["m.json"]["data"]["y"]
        for row in shown
        for e in (row.get("experiments") or [])
        for e in e["revs"]
        if e.get("name")
    }
    assert ys == {"sweep-1": 3, "sweep-2": 4}
    for name in names:  # the stage that does not read the swept param is not run again
        logs = subprocess.run((*dvc, "queue", "logs", name), cwd=tmp_path, capture_output=True, text=True).stdout
        assert "Stage 'one' didn't change" in logs and "Running stage 'two'" in logs, logs
