"""The pipeline as a Prefect flow: one task per DVC stage, in dvc.yaml's order.

Each task asks DVC to reproduce its one stage: DVC skips it when deps and params are
unchanged and records dvc.lock when it runs, so the flow and `dvc repro` can never
disagree and `dvc status` is clean after a flow run. MLflow gets one parent run per
flow run; each stage's process opens its child run under it (skipped stages get a
child run tagged `skipped`, so every execution shows all five).
"""

from __future__ import annotations

import os
import sys
import time

from prefect import flow, task

from tuneline import ROOT
from tuneline.config import load_params
from tuneline.errors import TunelineError
from tuneline.stages import stage_names
from tuneline.tracking import PARENT_ENV, start_parent


@task(name="stage", task_run_name="{name}")
def run_stage(name: str) -> str:
    """Reproduce one stage if its inputs changed; returns 'ran' or 'skipped'."""
    import logging

    from dvc.exceptions import DvcException, ReproductionError
    from dvc.repo import Repo

    logging.getLogger("dvc").propagate = False  # DVC prints its own progress; don't echo it twice
    try:
        with Repo(str(ROOT)) as repo:
            ran = repo.reproduce(name, single_item=True)
    except ReproductionError:
        # The stage printed its own one-line error; this names where it happened.
        raise TunelineError(f"stage '{name}' failed (its error is printed above)",
                            "fix the cause, then re-run: finished stages are reused") from None
    except DvcException as e:
        raise TunelineError(f"dvc: {' '.join(str(e).split())[:300]}", "fix dvc.yaml / params.yaml as the message says") from None
    return "ran" if ran else "skipped"


def _record_skipped(parent: str, name: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_run(parent).info.experiment_id
    run = client.create_run(exp, tags={"mlflow.parentRunId": parent, "mlflow.runName": name,
                                       "tuneline.stage": name, "tuneline.kind": "stage",
                                       "tuneline.status": "skipped: nothing changed"})
    client.set_terminated(run.info.run_id, "FINISHED")


@flow(name="tuneline-pipeline", log_prints=True)
def pipeline() -> dict[str, str]:
    """Run prepare → tokenize → train → evaluate → register, skipping what is up to date."""
    from mlflow import MlflowClient

    params = load_params(ROOT / "params.yaml")  # validate before any work
    parent = start_parent(params, "prefect")
    client = MlflowClient()
    # Stage processes find the parent through the environment; `python` must be this one.
    os.environ[PARENT_ENV] = parent
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    status: dict[str, str] = {}
    t0 = time.time()
    try:
        for name in stage_names():
            status[name] = run_stage(name)
            if status[name] == "skipped":
                _record_skipped(parent, name)
    except BaseException:
        client.set_terminated(parent, "FAILED")
        raise
    finally:
        os.environ.pop(PARENT_ENV, None)
    client.set_tag(parent, "tuneline.stages", ", ".join(f"{k}={v}" for k, v in status.items()))
    client.log_metric(parent, "pipeline_wall_s", time.time() - t0)
    client.set_terminated(parent, "FINISHED")
    return status


if __name__ == "__main__":
    print(pipeline())
