"""MLflow: one parent run per pipeline execution, one child run per stage.

The parent is found, whichever way the pipeline was started:
- a Prefect flow creates it and passes TUNELINE_PARENT_RUN_ID to the stages;
- under `dvc repro` / `dvc exp run`, stages are separate processes of one DVC process,
  so the parent is keyed on that ancestor process (pid + start time);
- a stage run on its own gets a parent of its own.

A sweep arm that DVC's queue runs (tuneline/sweep.py) is a `dvc exp run` in a temporary
copy of the project: its parent run is the arm's, nested under the sweep's parent run, and
it logs to the sweep's store (a file in the project names both: `store.arm_record`), not to an
mlflow.db in the copy that DVC deletes afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator

from tuneline.config import Params, flatten
from tuneline.secrets import redact
from tuneline.store import arm_record, check_store, open_store, sqlite_path

PARENT_ENV = "TUNELINE_PARENT_RUN_ID"
SWEEP_ENV = "TUNELINE_SWEEP_RUN_ID"  # set by a sweep: the pipeline runs it starts nest under it
EXEC_TAG = "tuneline.execution"
OWNER_TAG = "tuneline.owner"  # <host>:<pid>:<start time> of the process whose end ends the run
KIND_TAG, TRAINING = "mlflow.experimentKind", "custom_model_development"


def setup(experiment: str) -> str:
    """Point MLflow at the store and return the experiment id (created on first use)."""
    import mlflow

    db = sqlite_path(open_store())
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        # An SQLite store keeps artifacts beside it (mlflow.db -> mlartifacts/), so every
        # project sharing it finds them; MLflow's default is the cwd of whoever came first.
        location = (db.parent / "mlartifacts").as_uri() if db is not None else None
        try:
            exp_id = mlflow.create_experiment(experiment, artifact_location=location)
        except Exception:  # another process created it first
            exp_id = mlflow.get_experiment_by_name(experiment).experiment_id
    else:
        exp_id = exp.experiment_id
    if exp is None or exp.tags.get(KIND_TAG) != TRAINING:
        # MLflow 3's UI opens an experiment on its GenAI traces view unless it is told these
        # are model-training runs; then it opens on the runs table, the charts and the models.
        mlflow.MlflowClient().set_experiment_tag(exp_id, KIND_TAG, TRAINING)
    mlflow.set_experiment(experiment_id=exp_id)  # runs started with mlflow.start_run() land here
    return exp_id


def _dvc_process():
    """The `dvc repro` / `dvc exp run` process this stage runs under, if any."""
    import psutil

    for anc in psutil.Process().parents():
        try:
            cmd = " ".join(anc.cmdline())
        except psutil.Error:
            continue
        if re.search(r"\bdvc\b", cmd) and re.search(r"\b(repro|exp)\b", cmd):
            return anc
    return None


def _dvc_execution_key(anc) -> str:
    # one queue worker runs experiment after experiment: each is its own execution
    exp = os.environ.get("DVC_EXP_NAME")
    return f"dvc-{anc.pid}-{int(anc.create_time())}" + (f"-{exp}" if exp else "")


def _owner(proc=None) -> str:
    import socket

    import psutil

    proc = proc or psutil.Process()
    return f"{socket.gethostname()}:{proc.pid}:{int(proc.create_time())}"


def _alive(owner: str) -> bool:
    import psutil

    _, pid, started = owner.rsplit(":", 2)
    try:
        return int(psutil.Process(int(pid)).create_time()) == int(started)
    except (psutil.Error, ValueError):
        return False


def end_orphans(exp_id: str) -> list[str]:
    """Mark KILLED the runs that a process on this machine left RUNNING when it died without
    ending them (SIGKILL, out of memory, power cut): the UI would show them running forever.
    Runs owned by another machine, or by a process still alive, are left as they are."""
    import socket

    from mlflow import MlflowClient

    client = MlflowClient()
    host = socket.gethostname()
    running = client.search_runs(
        [exp_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{OWNER_TAG}` LIKE '{host}:%'"
    )
    ended = []
    for run in running:
        owner = run.data.tags[OWNER_TAG]
        if owner.rsplit(":", 2)[0] == host and not _alive(owner):
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    return ended


def start_parent(params: Params, source: str, dvc=None) -> str:
    """Create a parent run (status RUNNING) and return its id. `dvc`: the DVC process the
    execution runs under (it keys the run, and outlives each stage), if any."""
    from mlflow import MlflowClient

    exp_id = setup(params.register.experiment)
    end_orphans(exp_id)  # what killed executions left RUNNING, before this one starts
    client = MlflowClient()
    tags = {
        "tuneline.kind": "pipeline",
        "tuneline.source": source,
        "mlflow.runName": f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}",
        OWNER_TAG: _owner(dvc),  # the parent lives as long as the dvc process, or this one
    }
    if dvc is not None:
        tags[EXEC_TAG] = _dvc_execution_key(dvc)
    arm, sweep = arm_record(), os.environ.get(SWEEP_ENV)
    if arm:  # one arm of a sweep: a child of the sweep's run, named as DVC names the experiment
        tags |= {"mlflow.parentRunId": arm["sweep_run_id"], "mlflow.runName": arm["name"], "tuneline.kind": "arm"}
        tags["dvc.experiment"] = arm["name"]
    elif sweep:  # the sweep's winner, evaluated and gated
        tags["mlflow.parentRunId"] = sweep
    run = client.create_run(exp_id, tags=tags)
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def find_parent(params: Params) -> str:
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    from mlflow import MlflowClient

    exp_id = setup(params.register.experiment)
    dvc = _dvc_process()
    if dvc is not None:
        key = _dvc_execution_key(dvc)
        found = MlflowClient().search_runs([exp_id], filter_string=f"tags.`{EXEC_TAG}` = '{key}'", max_results=1)
        if found:
            return found[0].info.run_id
    return start_parent(params, "stage" if dvc is None else "dvc", dvc)


def log_params(client, run_id: str, params: Params) -> None:
    from mlflow.entities import Param

    flat = [Param(k, redact(str(v))[:6000]) for k, v in flatten(params).items()]
    client.log_batch(run_id, params=flat)


@contextlib.contextmanager
def stage_run(stage: str, params: Params) -> Iterator[str]:
    """Open the stage's child run under the execution's parent; yields the child run id.

    On error both runs are marked FAILED and the error propagates.
    """
    import mlflow

    check_store()
    parent = find_parent(params)
    client = mlflow.MlflowClient()
    child = client.create_run(
        client.get_run(parent).info.experiment_id,
        tags={
            "mlflow.parentRunId": parent,
            "mlflow.runName": stage,
            "tuneline.stage": stage,
            "tuneline.kind": "stage",
            OWNER_TAG: _owner(),
        },
    ).info.run_id
    log_params(client, child, params)
    mlflow.start_run(run_id=child)
    try:
        yield child
    except KeyboardInterrupt:
        # A Ctrl-C can land inside an MLflow write to SQLite and leave that write's lock held
        # until this process exits; every later write then waits 20-45 s and fails, and the
        # stage ended in an "unexpected" line instead of "interrupted". Mark the runs KILLED if
        # the store answers in seconds, and never wait longer (the stage then exits at once).
        if _set_terminated_within([child, parent], "KILLED", INTERRUPT_GRACE):
            mlflow.end_run("KILLED")  # the store answers: a quick write
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        client.set_terminated(parent, "FAILED")
        raise
    mlflow.end_run()
    # The parent stays RUNNING under a flow (the flow ends it); under DVC the last stage
    # to finish leaves it FINISHED.
    if not os.environ.get(PARENT_ENV):
        client.set_terminated(parent, "FINISHED")


INTERRUPT_GRACE = 5.0  # s an interrupted stage gives the store to record it


def _set_terminated_within(runs: list[str], status: str, seconds: float) -> bool:
    """Best effort, in a daemon thread: whether the store recorded it in time (if not, it is
    left as it is)."""
    import threading

    done: list[bool] = []

    def end() -> None:
        from mlflow import MlflowClient

        try:
            for run in runs:
                MlflowClient().set_terminated(run, status)
            done.append(True)
        except Exception:  # the store is locked or gone: the flow records the failure
            pass

    worker = threading.Thread(target=end, name="tuneline-end-runs", daemon=True)
    worker.start()
    worker.join(seconds)
    return bool(done)


def _run_ids() -> list[str]:
    """The active (child) run and its parent: what a stage shows is shown on both, so the
    pipeline's parent run in the UI has the whole story."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return []
    parent = run.data.tags.get("mlflow.parentRunId")
    return [run.info.run_id] + ([parent] if parent else [])


def log_metrics(metrics: dict[str, float], prefix: str = "", step: int | None = None) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [
        Metric(f"{prefix}{k}", float(v), ts, step or 0)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    for run_id in _run_ids():
        MlflowClient().log_batch(run_id, metrics=batch)


def log_figure(fig, name: str) -> None:
    from mlflow import MlflowClient

    for run_id in _run_ids():
        MlflowClient().log_figure(run_id, fig, name)


def log_table(table: dict[str, list], name: str) -> None:
    from mlflow import MlflowClient

    for run_id in _run_ids():
        MlflowClient().log_table(run_id, table, name)
