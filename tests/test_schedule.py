"""Schedules: `tuneline schedule --cron` against a real Prefect server on 127.0.0.1, the
prefect.yaml work-pool deployment, skipping unchanged runs, I/O-only retries, hub revisions."""

import json
import os
import re
import sys
import time

import pytest
import yaml
from live_servers import wait_for

STAGES = ["prepare", "tokenize", "train", "validate", "evaluate", "register"]


@pytest.mark.slow
def test_a_served_schedule_runs_the_pipeline_and_records_its_parameters_everywhere(served):
    dep = served.deployment
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
    assert re.search(r"on '0 3 \* \* \*' \(UTC, next run \d{4}-\d\d-\d\d 03:00 UTC\)", served.log("serve.log"))
    run = served.first
    assert (run["state_type"], run["state_name"]) == ("COMPLETED", "Completed"), served.log("serve.log")[-3000:]
    # Prefect: the flow run's parameters, and one Completed task per stage.
    assert run["parameters"] == {"recipe": None, "overrides": ["train.lr=0.003"]}
    tasks = served.task_runs(served.first_id)
    assert all(tasks[s] == "COMPLETED" for s in STAGES), tasks
    # MLflow: the pipeline run names the flow run, the recipe and the overrides, and has the values.
    parent = json.loads(
        served.proj.python(
            "import json, mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db')\n"
            f"r = mlflow.search_runs(search_all_experiments=True, output_format='list', "
            f"filter_string=\"tags.`prefect.flow_run_id` = '{served.first_id}'\")[0]\n"
            "print(json.dumps([r.data.tags, r.data.params]))"
        )
        .strip()
        .splitlines()[-1]
    )
    tags, params = parent
    assert tags["tuneline.overrides"] == "train.lr=0.003" and params["train.lr"] == "0.003"
    assert tags["tuneline.champion"] == "descrambler v1"
    # DVC: the run is an experiment whose params have the override and whose message is the command.
    exps = served.proj.dvc_json("exp", "show")
    revs = [r for e in exps for x in (e.get("experiments") or []) for r in x["revs"]]
    assert [r["data"]["params"]["params.yaml"]["data"]["train"]["lr"] for r in revs] == [0.003]
    log = served.proj.run("git", "log", "--all", "--format=%s").stdout
    assert "tuneline run --set train.lr=0.003" in log


def _n_runs(served) -> int:
    return int(
        served.proj.python(
            "import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db')\n"
            "print(len(mlflow.search_runs(search_all_experiments=True)))"
        ).split()[-1]
    )


@pytest.mark.slow
def test_a_scheduled_run_with_nothing_changed_is_skipped_and_trains_nothing(served):
    root = served.root
    watched = [root / "models" / "merged" / "model.safetensors", root / "metrics" / "train.json", root / "dvc.lock"]
    before = [p.stat().st_mtime_ns for p in watched]
    n_runs = _n_runs(served)
    run = served.wait(served.trigger(), timeout=300)
    assert (run["state_type"], run["state_name"], run["state"]["message"]) == (
        "COMPLETED",
        "Skipped",
        "skipped: nothing changed",
    )
    assert not set(STAGES) & set(served.task_runs(run["id"]))  # no stage task even started
    assert [p.stat().st_mtime_ns for p in watched] == before
    assert _n_runs(served) == n_runs  # not even a pipeline run in MLflow
    print(f"skipped scheduled run: {run['total_run_time']:.1f}s of flow time")


@pytest.mark.slow
def test_prefect_yaml_deploys_the_flow_to_a_process_work_pool_that_a_worker_runs(served):
    # `prefect deploy` resolves {{ $PWD }} from the environment, as a shell in the project sets it.
    served.run("prefect", "work-pool", "create", "tuneline", "--type", "process")
    served.run("prefect", "--no-prompt", "deploy", "--name", "nightly", PWD=str(served.root))
    dep = served.api("deployments/name/tuneline-pipeline/nightly")
    assert dep["work_pool_name"] == "tuneline" and dep["global_concurrency_limit"]["limit"] == 1
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
    assert re.search(r"on '0 3 \* \* \*' \(UTC, next run \d{4}-\d\d-\d\d 03:00 UTC\)", served.log("serve.log"))
    assert dep["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(served.root)
    started = served.run("prefect", "deployment", "run", "tuneline-pipeline/nightly")
    run_id = started.stdout.split("UUID: ")[1].split()[0]
    # A worker started elsewhere picks the run up and runs it in the project: nothing changed.
    served.run("prefect", "worker", "start", "--pool", "tuneline", "--run-once", cwd="/")
    state = wait_for(
        "the worker's run", lambda: (r := served.api(f"flow_runs/{run_id}"))["state_type"] == "COMPLETED" and r, 120
    )
    assert state["state_name"] == "Skipped"


def test_every_server_the_project_started_listens_on_loopback_only(served):
    """`tuneline ui` (MLflow, Prefect) and `tuneline schedule` (its runner): no socket open to
    the network unless the user passes --host."""
    import psutil

    listening = set()
    for proc in served.procs:
        parent = psutil.Process(proc.pid)
        for p in [parent, *parent.children(recursive=True)]:
            try:
                listening |= {
                    (c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
                }
            except psutil.Error:
                pass
    ports = {int(served.mlflow.rsplit(":", 1)[1]), int(served.prefect.rsplit(":", 1)[1])}
    assert ports <= {port for _, port in listening}, listening
    assert {ip for ip, _ in listening} <= {"127.0.0.1", "::1"}, listening


def test_only_io_bound_tasks_retry():
    """Stages are never re-run behind the user's back: a failed train is reported, not retried."""
    from prefect import Task

    import flows.dvc_tasks as dt
    import flows.pipeline as fp

    tasks = [t for m in (fp, dt) for t in vars(m).values() if isinstance(t, Task)]
    assert {t.name for t in tasks} >= {"stage", "dvc-status", "save-experiment", "smoke-stage"}
    assert {t.name for t in tasks if t.retries} == {"write-params", "check-sources", "registry"}
    assert dt.reproduce.retries == 0


@pytest.fixture
def prepared(tmp_path, monkeypatch):
    """A project whose prepared data came from a hub dataset at revision 'aaa'."""
    import flows.dvc_tasks as fp

    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "data" / "prepared" / "lineage.json").write_text(
        json.dumps({"source": {"source": "hf:dair-ai/emotion#train", "revision": "aaa"}})
    )
    monkeypatch.setattr(fp, "ROOT", tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return fp


def test_a_hub_dataset_with_a_new_revision_is_prepared_again(prepared, monkeypatch):
    from tuneline import sources

    monkeypatch.setattr(sources, "hub_revision", lambda spec: "aaa")
    assert prepared._source_changed() is None
    monkeypatch.setattr(sources, "hub_revision", lambda spec: "bbb4567890abcdef")
    assert "new revision bbb4567890ab (was aaa)" in prepared._source_changed()
    from tuneline import recipes

    forced = prepared.changed_inputs.fn(recipes.build("emotion", [], False, None))
    assert list(forced) == ["prepare"]  # the flow forces prepare; DVC re-runs what depends on it


def test_the_hub_is_not_asked_when_offline_and_an_unreachable_hub_is_one_clear_error(prepared, monkeypatch, capsys):
    from tuneline import sources
    from tuneline.errors import TunelineError

    def down(spec):
        raise ConnectionError("no route")

    monkeypatch.setattr(sources, "hub_revision", down)
    with pytest.raises(TunelineError, match="cannot ask the hub for the revision of 'hf:dair-ai/emotion#train'.*pin"):
        prepared._source_changed()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert prepared._source_changed() is None
    assert "not checking 'hf:dair-ai/emotion#train'" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("cron", "problem", "fix"),
    [
        ("every day", "is not a cron expression", "give five fields"),
        ("0 3 * *", "is not a cron expression", "give five fields"),
        ("61 3 * * *", "is not a cron expression: a field is out of its range", "minute 0-59, hour 0-23"),
        # Prefect accepts both, and would never run the first and run the second every second of a minute.
        ("0 3 30 2 *", "never runs: no date matches its day-of-month and month", "choose a day that month has"),
        ("0 0 3 * * *", "has 6 fields, and a sixth would be read as seconds", "give five fields"),
    ],
)
def test_schedule_rejects_a_bad_cron_in_one_line_before_serving(cron, problem, fix, project):
    proc = project.run(sys.executable, "-m", "tuneline.cli", "schedule", "--cron", cron, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--cron '{cron}' {problem}. Fix: {fix}" in lines[0], lines


def test_schedule_validates_params_and_the_server_before_serving(project):
    proc = project.run(
        sys.executable, "-m", "tuneline.cli", "schedule", "--cron", "0 3 * * *", "--set", "train.lrr=1", check=False
    )
    assert proc.returncode == 2 and "did you mean 'train.lr'" in proc.stderr
    proc = project.run(
        sys.executable, "-m", "tuneline.cli", "schedule", "--cron", "0 3 * * *", "--name", "a/b", check=False
    )  # Prefect's runner refuses it only once serving starts
    assert proc.returncode == 2 and "--name 'a/b' holds '/'" in proc.stderr and len(proc.stderr.splitlines()) == 1
    project.env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"  # nothing listens on port 9
    t = time.time()
    proc = project.run(sys.executable, "-m", "tuneline.cli", "schedule", "--cron", "0 3 * * *", check=False)
    assert proc.returncode == 2 and "does not answer" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert time.time() - t < 60


def test_schedule_refuses_a_run_its_registered_name_holds_no_model_for_before_serving(monkeypatch):
    """A nightly `--recipe emotion --set register.model_name=descrambler` was served, and
    every night's run failed on it: the schedule says so once, before it serves."""
    from flows import schedule as sched
    from tuneline import serving
    from tuneline.errors import TunelineError

    asked = []

    def other_task(params):
        asked.append(params.register.model_name)
        raise TunelineError("register.model_name 'descrambler' holds a model for the descramble task", "rename")

    monkeypatch.setattr(serving, "check_champion_task", other_task)
    monkeypatch.setattr(sched.servers, "answers", lambda *a, **k: pytest.fail("asked for a server"))
    with pytest.raises(TunelineError, match="holds a model for the descramble task"):
        sched.schedule("0 3 * * *", "emotion", ["register.model_name=descrambler"])
    assert asked == ["descrambler"]


def test_params_yaml_is_left_alone_when_a_recipe_run_changes_no_value(tmp_path, monkeypatch):
    """A nightly `--recipe` run rewrites params.yaml only if a value changed: git stays clean."""
    import flows.pipeline as fp
    from tuneline import recipes

    monkeypatch.setattr(fp, "ROOT", tmp_path)
    params = recipes.build("descramble", [], False, None)
    assert fp.write_params.fn(params, "first") is True
    text = (tmp_path / "params.yaml").read_text()
    assert fp.write_params.fn(params, "second") is False and (tmp_path / "params.yaml").read_text() == text
    assert fp.write_params.fn(recipes.build("descramble", ["train.lr=0.001"], False, None), "third") is True
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["train"]["lr"] == 0.001
    assert os.path.exists(tmp_path / "params.yaml")


def test_new_weights_under_the_same_model_folder_train_again(tmp_path, monkeypatch, local_model):
    """model.name is a param, so DVC sees a local folder's name, not its files: new weights
    saved there left every stage 'up to date' (and the old base's scores cached)."""
    import flows.dvc_tasks as fp
    from tuneline import recipes
    from tuneline.data import BASE_META
    from tuneline.modeling import identity

    monkeypatch.setattr(fp, "ROOT", tmp_path)
    folder = local_model
    params = recipes.build(None, [f"model.name={folder}"], False, None)
    assert fp._base_changed(params) is None  # no train yet
    (tmp_path / BASE_META).parent.mkdir()
    (tmp_path / BASE_META).write_text(json.dumps({"model": str(folder), "identity": identity(str(folder))}))
    assert fp.changed_inputs.fn(params) == {}
    (folder / "model.safetensors").write_bytes(b"new weights")
    assert fp.changed_inputs.fn(params) == {"train": f"the files of model.name '{folder}' changed since the last train"}
    other = recipes.build(None, ["model.name=tiny-gpt2"], False, None)
    assert fp._base_changed(other) is None  # another name: a param change, which DVC sees itself


def test_sigterm_to_schedule_interrupts_the_runs_it_serves_and_their_stages(tmp_path):
    """`kill PID` / `docker stop` of `tuneline schedule` (Prefect's runner turns SIGTERM into
    an exit): its flow runs (multiprocessing children) and their stages are interrupted as by
    Ctrl-C. They used to run on while the server was stopped under them."""
    import multiprocessing

    from flows.schedule import stop_runs

    # A stage that says it was interrupted; its run waits for it and ignores SIGINT meanwhile
    # (os.system does), so the run ends only if the stage itself was interrupted.
    stage = tmp_path / "stage.py"
    said = tmp_path / "said"
    stage.write_text(
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGINT, lambda *_: (open({str(said)!r}, 'w').write('interrupted'), sys.exit(130)))\n"
        f"open({str(said)!r} + '.up', 'w').close()\n"
        "time.sleep(60)\n"
    )
    run = multiprocessing.get_context("spawn").Process(target=os.system, args=(f"{sys.executable} {stage}",))
    run.start()
    t = time.time()
    wait_for("the run's stage", lambda: (tmp_path / "said.up").exists(), 60)
    stop_runs(grace=30)
    assert not run.is_alive() and time.time() - t < 30
    assert said.read_text() == "interrupted"
