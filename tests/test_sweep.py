"""Sweeps: the spec, every arm validated before anything runs, and the winner chosen on the
validation split with the number of arms accounted for (tuneline/sweep.py)."""

import json
import os
import re
import sys

import numpy as np
import pytest
import yaml
from test_pipeline import _runs

from tuneline import recipes, scoring, sweep, sweep_queue
from tuneline.errors import TunelineError
from tuneline.params_file import parse_params

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


def test_an_arm_whose_steps_the_packed_data_cannot_fill_is_named_before_any_arm_trains():
    """grad_accum is checked against the packed rows once tokenize has run (10 rows at
    batch_size 2 make 5 micro-batches an epoch), so the sweep stops before arm 1 trains."""
    arms = sweep.arms(sweep.parse_grid(["train.grad_accum=5,6"], DEFAULTS))
    params = sweep.validate(lambda sets: recipes.build("descramble", ["train.batch_size=2", *sets]), arms)
    sweep.check_arms(arms[:1], params[:1], train_rows=10)
    with pytest.raises(TunelineError, match=r"sweep arm 2 \(train.grad_accum=6\): .*at most 5"):
        sweep.check_arms(arms, params, train_rows=10)


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
    with pytest.raises(TunelineError, match=r"--range needs --sample N.*Fix: add e.g. --sample 4"):
        sweep.arms({}, sweep.parse_ranges(["train.lora_r=8,16"], DEFAULTS))
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


def test_a_sweep_may_not_vary_the_data_or_the_scoring():
    with pytest.raises(TunelineError, match=r"cannot vary 'prepare.n_train'.*Fix: sweep train"):
        sweep.check_keys([{"train.lr": 1e-3, "prepare.n_train": 10}])
    sweep.check_keys([{"train.lr": 1e-3, "model.name": "tiny-gpt2"}])


def test_a_set_key_the_sweep_varies_is_refused():
    """`--set train.lr=0.1 --grid train.lr=0.1,0.2`: every arm's lr replaced the --set one unsaid."""
    arms = [{"train.lr": 1e-3}, {"train.lr": 1e-2}]
    with pytest.raises(
        TunelineError, match=r"--set 'train.lr=0.1' gives 'train.lr' to every arm, and the sweep varies"
    ):
        sweep.check_overrides(["train.epochs=2", "train.lr=0.1"], arms)
    sweep.check_overrides(["train.epochs=2", "model.name=tiny-gpt2"], arms)


def test_time_left_ignores_an_arm_restored_from_the_run_cache():
    """An arm with the pipeline's own params is restored in seconds: the arms after it still
    take as long as training does (a user was told 'about 12 s left' before a 4-minute arm)."""
    estimates = [270.0, 270.0, 300.0]
    assert sweep.time_left([1, 2], {0: 16.0}, estimates, jobs=1) == 570.0  # the plan's estimates
    assert sweep.time_left([2], {0: 16.0, 1: 200.0}, estimates, jobs=1) == 200.0  # measured, restored one aside
    assert sweep.time_left([1, 2], {0: 100.0}, None, jobs=2) == 100.0  # no estimate: the arms measured
    assert sweep.time_left([1], {}, None, jobs=1) is None


def test_the_time_estimate_comes_only_from_a_last_run_on_the_same_data_and_model():
    """A pretraining run's step time and packed rows said 'about 143 min' for a sweep of the
    default descrambling job (~10 min) in the same project."""
    from tuneline.config import flatten

    params = recipes.build("descramble", [])
    flat = flatten(params)

    def lock(**over):
        recorded = {"prepare": [k for k in flat if k.startswith("prepare.")] + ["seed"]}
        recorded |= {"tokenize": [k for k in flat if k.startswith("tokenize.")], "train": ["model.name", "train.lr"]}
        return {s: {"params": {"params.yaml": {k: over.get(k, flat[k]) for k in keys}}} for s, keys in recorded.items()}

    assert sweep.unlike_last(params, lock()) is None
    assert sweep.unlike_last(params, lock(**{"train.lr": 0.1})) is None  # what the arms sweep may differ
    assert sweep.unlike_last(params, lock(**{"model.name": "gpt2-scratch-tiny"})) == "model.name"
    assert sweep.unlike_last(params, lock(**{"prepare.task": "pretrain"})) == "prepare.task"
    assert sweep.unlike_last(params, lock(**{"tokenize.max_length": 128})) == "tokenize.max_length"
    pretrained = lock(**{"prepare.task": "pretrain", "prepare.min_words": 20, "model.name": "gpt2-scratch-tiny"})
    assert sweep.unlike_last(params, pretrained) == "prepare.task"  # the one a user recognises, of three


def test_the_same_arms_are_the_same_sweep_whatever_the_base():
    """What lets a sweep run again find its arms, even after its winner was applied."""

    def build(applied: list[str], sets: list[str]):  # params.yaml with `applied` in it, and an arm's sets
        base = recipes.merge(recipes.build("descramble").model_dump(), recipes.parse_set(applied))
        return recipes.build(None, sets, False, base)

    arms = sweep.arms(sweep.parse_grid(["train.lr=1e-3,2e-3"], DEFAULTS))
    a = sweep.name(sweep.validate(lambda sets: build([], sets), arms))
    b = sweep.name(sweep.validate(lambda sets: build(["train.lr=5e-3"], sets), arms))
    c = sweep.name(sweep.validate(lambda sets: build(["train.lora_r=4"], sets), arms))
    assert a == b != c


def test_new_weights_under_a_local_base_folder_are_a_new_sweep(tmp_path, monkeypatch, local_model):
    """Else the same command would find the arms trained on the old weights and rerun none."""
    import flows.sweep as fs

    monkeypatch.setattr(fs, "ROOT", tmp_path)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"prepare": {}, "tokenize": {}}}))
    arms = sweep.arms(sweep.parse_grid(["train.lr=1e-3,2e-3"], DEFAULTS))
    local = sweep.validate(lambda sets: recipes.build(None, [f"model.name={local_model}", *sets]), arms)
    built_in = sweep.validate(lambda sets: recipes.build(None, list(sets)), arms)
    before = sweep.name(local, fs._inputs(local))
    assert sweep.name(local, fs._inputs(local)) == before
    (local_model / "model.safetensors").write_bytes(b"new weights")
    assert sweep.name(local, fs._inputs(local)) != before
    assert json.loads(fs._inputs(built_in))[2:] == []  # a built-in's sweeps keep the names they had


# --- the whole sweep, on the tiny model --------------------------------------------------------


def _arms(proj) -> dict[str, str]:
    """The sweep's DVC experiments (the winner's gated run is saved as one too)."""
    return {n: c for n, c in sweep_queue.experiments(proj.root).items() if n.startswith("sweep-")}


@pytest.fixture(scope="module")
def swept(tmp_path_factory, model_cache, prefect_api):
    """A tiny project swept over two learning rates: Ctrl-C while the second arm runs, then
    the same command again. Its data is a file beside the project (as the recipes read
    ../shared/data), named by a relative path: DVC's queue runs each arm in a copy of the
    project under .dvc/tmp/exps/, where that path would lead nowhere. The project's own
    models/merged holds no weights: an arm that loaded it rather than its own would fail.
    Returns (project, first output, second output)."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, make_project, venv_not_on
    from live_servers import wait_for

    from tuneline import sources, tasks

    home = tmp_path_factory.mktemp("sweep")
    batches, _, _ = sources.load("builtin:wikipedia")  # the default job's articles, as a user's own text
    docs = [r["text"] for r in next(iter(batches))]
    keep = next(n for n in range(50, len(docs), 50) if len(tasks.clean_sentences(docs[:n], 6, 30)) > 400)
    (home / "articles.txt").write_text("\n\n".join(docs[:keep]))
    proj = make_project(home / "proj", model_cache, {"prepare": {"source": "../articles.txt"}})
    # The project's own trained model, as a run before the sweep leaves it (untracked, so
    # not in an arm's copy): an arm must validate the model it trained, never this one.
    (proj.root / "models" / "merged").mkdir(parents=True)
    (proj.root / "models" / "merged" / "config.json").write_text('{"model_type": "gpt2"}')
    shutil.copy(REPO / ".gitignore", proj.root / ".gitignore")
    proj.run("git", "add", "-A")
    proj.run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    cmd = [sys.executable, "-m", "tuneline.cli", "sweep", "--grid", "train.lr=1e-3,1e-2"]
    env = proj.env | {"PREFECT_API_URL": prefect_api, "PATH": venv_not_on(proj.env["PATH"])}
    log = proj.root.parent / "first.txt"
    with open(log, "w") as f:
        first = subprocess.Popen(
            cmd, cwd=proj.root, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.time() + 600
    while not re.search(r"sweep-\w+-2: running", log.read_text()):
        assert first.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(1)
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C in the terminal
    assert first.wait(timeout=120) == 130, log.read_text()[-3000:]
    # its running arm stopped too (it trains under DVC's queue worker, in a session of its own)
    queue = lambda: proj.run(sys.executable, "-m", "dvc", "queue", "status").stdout  # noqa: E731
    wait_for("the stopped arm to end", lambda: "Running" not in queue(), 60)
    second = proj.run(*cmd, env=env, timeout=900)
    return proj, log.read_text(), second.stdout + second.stderr


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_and_the_same_command_runs_only_the_rest(swept):
    proj, first, second = swept
    assert "error: sweep interrupted" in first and "Traceback" not in first
    assert re.search(r"sweep-\w+-1: success, validation chrf", first)
    assert "1 of 2 arms already run or queued: not run again" in second
    assert re.search(r"sweep-\w+-2: success", second) and not re.search(r"sweep-\w+-1: (running|success)", second)
    # prepare and tokenize ran once, in the project; every arm found them done
    assert first.count("Running stage 'tokenize'") == 1 and "Running stage 'tokenize'" not in second
    for n in _arms(proj):
        logs = proj.run(sys.executable, "-m", "dvc", "queue", "logs", n).stdout
        assert "Stage 'tokenize' didn't change" in logs and "Running stage 'train'" in logs, logs


@pytest.mark.slow
def test_an_arms_progress_is_its_newest_line_in_dvcs_queue_log(swept):
    """What the sweep shows of a running arm is read from the log DVC's queue writes for it
    (no DVC process beside the training): the same line `dvc queue logs` ends with, also for
    the arm that was stopped and queued again."""
    proj, _, _ = swept
    for n in _arms(proj):
        logs = proj.run(sys.executable, "-m", "dvc", "queue", "logs", n).stdout.splitlines()
        ours = [line.strip() for line in logs if line.strip().startswith("[")]
        assert ours and sweep_queue.last_progress(n, proj.root) == ours[-1], (n, logs[-5:])
    assert sweep_queue.last_progress("sweep-nosuch-1", proj.root) is None


@pytest.mark.slow
def test_only_the_winner_is_evaluated_on_test_and_gated(swept):
    proj, _, second = swept
    found = _arms(proj)
    val = {n: json.loads(sweep_queue.read_at(c, "metrics/validate.json", proj.root))["chrf"] for n, c in found.items()}
    winner = max(val, key=val.get)
    assert f"winner {winner}" in second and "sweep sweep-" in second and "finished" in second
    assert ", test chrf " in second  # the test figure is named
    for n, c in found.items():
        logs = proj.run(sys.executable, "-m", "dvc", "queue", "logs", n).stdout
        assert "Running stage 'evaluate'" not in logs  # no arm reads the test split
        assert sweep_queue.read_at(c, "metrics/eval.json", proj.root) is None
    runs = _runs(proj)
    evaluated = [r for r in runs if r["tags"].get("tuneline.stage") == "evaluate" and r["params"]]
    assert len(evaluated) == 1  # once, for the winner
    (arm,) = [r for r in runs if r["tags"].get("dvc.experiment") == winner]
    assert evaluated[0]["params"]["train.lr"] == arm["params"]["train.lr"]
    register = json.loads((proj.root / "metrics/register.json").read_text())
    assert register["gate"]["decision"] and register["version"] == 1
    # and the command that answers with the version it registered
    model = "" if register["promoted"] else " --model models:/descrambler/1"
    assert f"try it: tuneline predict{model} 'cat the on sat mat the'" in second


@pytest.mark.slow
def test_dvc_and_the_mlflow_parent_list_the_same_arms_with_the_same_numbers(swept):
    proj, _, _ = swept
    shown = proj.dvc_json("exp", "show")
    revs = [
        e
        for row in shown
        for x in (row.get("experiments") or [])
        for e in x["revs"]
        if (e.get("name") or "").startswith("sweep-")
    ]
    # the arm stopped by Ctrl-C is listed twice: its failed attempt (an `error`, no results
    # while DVC settles it) and its finished run
    failed = [e["name"] for e in revs if e.get("error")]
    dvc_val = {
        e["name"]: e["data"]["metrics"]["metrics/validate.json"]["data"]["chrf"] for e in revs if not e.get("error")
    }
    assert len(failed) <= 1 and set(failed) <= set(dvc_val), failed
    runs = _runs(proj)
    (parent,) = [r for r in runs if r["tags"].get("tuneline.kind") == "sweep"]
    arms = [
        r
        for r in runs
        if r["tags"].get("mlflow.parentRunId") == parent["id"] and r["tags"].get("tuneline.kind") == "arm"
    ]
    # the arm stopped by Ctrl-C left a KILLED attempt beside its finished run
    assert {r["status"] for r in arms} <= {"FINISHED", "KILLED", "FAILED"}
    arms = [r for r in arms if r["status"] == "FINISHED"]
    assert sorted(r["tags"]["dvc.experiment"] for r in arms) == sorted(dvc_val)
    assert {r["tags"]["dvc.experiment"]: r["metrics"]["val_chrf"] for r in arms} == pytest.approx(dvc_val)
    assert all("train_loss" in r["metrics"] and "train.lr" in r["params"] for r in arms)  # curves and params
    table = json.loads(
        proj.python(f"""
import json, mlflow
mlflow.set_tracking_uri('sqlite:///mlflow.db')
print(json.dumps(mlflow.MlflowClient().download_artifacts('{parent["id"]}', 'sweep_summary.json', '.')))
""")
        .strip()
        .splitlines()[-1]
    )
    with open(table) as f:
        table = json.load(f)  # MLflow's table: {"columns": [...], "data": [[...], ...]}
    col = {c: i for i, c in enumerate(table["columns"])}
    rows = {r[col["experiment"]]: r[col["val_chrf"]] for r in table["data"]}
    assert rows == pytest.approx(dvc_val)
    assert parent["metrics"]["winner_val_chrf"] == pytest.approx(max(dvc_val.values()))


@pytest.mark.slow
def test_a_bad_sweep_spec_is_one_line_before_anything_runs(project):
    """An unknown key, an empty list, an invalid value in one arm, a key that would change
    the validation examples: exit 2 with one line, and nothing written or started."""
    before = (project.root / "params.yaml").read_text()
    for args, said in [
        (["--grid", "train.lrr=1e-3,2e-3"], "unknown param 'train.lrr'"),
        (["--grid", "train.lr="], "has no values"),
        (["--grid", "train.lr=1e-3,-1"], "sweep arm 2 (train.lr=-1)"),
        (["--grid", "prepare.n_val=8,16"], "cannot vary 'prepare.n_val'"),
        (["--sample", "3"], "nothing to sweep"),
    ]:
        proc = project.run(sys.executable, "-m", "tuneline.cli", "sweep", *args, check=False)
        lines = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and said in lines[0] and "Fix:" in lines[0], lines
    assert (project.root / "params.yaml").read_text() == before
    assert not any((project.root / p).exists() for p in ("mlflow.db", "dvc.lock", "data", "metrics"))


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_sweep_and_compares_its_arms(swept):
    """What a reviewer opens: the sweep's parent run (its table and its plot) and MLflow's
    compare view of the arms, with the parallel-coordinates plot over the swept param."""
    import subprocess

    from live_servers import free_port, http_ok, wait_for
    from test_browser import _click_text, _shot, _shows, _training_view, _until, chromium

    proj = swept[0]
    runs = _runs(proj)
    (parent,) = [r for r in runs if r["tags"].get("tuneline.kind") == "sweep"]
    arms = [r for r in runs if r["tags"].get("tuneline.kind") == "arm" and r["status"] == "FINISHED"]
    exp = proj.python(
        "import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db')\n"
        "print(mlflow.get_experiment_by_name('tuneline').experiment_id)"
    ).split()[-1]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    art = (proj.root / "mlartifacts").as_uri()
    mlflow = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1"]
    mlflow += ["--port", str(port), "--workers", "1", "--backend-store-uri", "sqlite:///mlflow.db"]
    mlflow += ["--default-artifact-root", art]
    with open(proj.root.parent / "mlflow.log", "w") as log:
        server = subprocess.Popen(
            mlflow, cwd=proj.root, env=proj.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    d = None
    try:
        wait_for("MLflow", lambda: http_ok(f"{url}/health"), 180, server)
        d = chromium()
        d.get(f"{url}/#/experiments/{exp}/runs")
        _training_view(d)
        _shows(d, parent["tags"]["mlflow.runName"])
        _shot(d, "mlflow-sweep-runs")
        d.get(f"{url}/#/experiments/{exp}/runs/{parent['id']}")
        _shows(d, parent["tags"]["mlflow.runName"], "winner_val_chrf")
        _shot(d, "mlflow-sweep-run")
        d.get(f"{url}/#/experiments/{exp}/runs/{parent['id']}/artifacts")
        _click_text(d, "metric_vs_params.png")
        assert _until(
            d,
            "the metric-vs-params plot",
            lambda: d.execute_script("return [...document.images].some(i => i.complete && i.naturalWidth > 300)"),
        )
        _shot(d, "mlflow-sweep-plot")
        ids = ",".join(f'"{r["id"]}"' for r in arms)
        d.get(f'{url}/#/compare-runs?runs=[{ids}]&experiments=["{exp}"]')
        _shows(d, f"Comparing {len(arms)} Runs", "Parallel Coordinates Plot")
        # the plot's axes are the swept param (MLflow picks the params that differ) and a metric;
        # the tables below it hold every param, metric and tag of each arm
        text = _shows(d, "Parameters:\ntrain.lr\nMetrics:", "dvc.experiment", timeout=30)
        assert all(r["tags"]["mlflow.runName"] in text for r in arms)
        _shot(d, "mlflow-sweep-compare")
    finally:
        if d is not None:
            d.quit()
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_a_sweep_is_served_on_a_schedule_with_its_spec(monkeypatch):
    """`tuneline schedule --grid ...` serves the sweep flow (not the pipeline) with the
    sweep's parameters, after validating its arms."""
    from flows import schedule as sch
    from flows import sweep as flow

    served, planned = {}, []
    monkeypatch.setattr(flow.sweep_flow, "serve", lambda **kw: served.update(kw))
    monkeypatch.setattr(flow.plan, "fn", lambda *args: planned.append(args))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    monkeypatch.setattr(sch.servers, "answers", lambda *a, **k: True)
    spec = {"grid": ["train.lr=1e-3,2e-3"], "ranges": [], "sample": 0, "jobs": 1}
    said = []
    sch.schedule("0 3 * * 0", "descramble", ["train.max_steps=5"], None, say=said.append, sweep=spec)
    assert planned == [("descramble", ["train.max_steps=5"], ["train.lr=1e-3,2e-3"], [], 0, 1)]
    assert served["cron"] == "0 3 * * 0" and served["name"] == "descramble"
    assert served["parameters"] == {"recipe": "descramble", "overrides": ["train.max_steps=5"], **spec}
    assert "serving 'tuneline-sweep/descramble'" in said[0]
