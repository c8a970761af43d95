"""The pipeline as a Prefect flow: one task per DVC stage, in dvc.yaml's order.

Each task asks DVC to reproduce its one stage: DVC skips it when deps and params are
unchanged and records dvc.lock when it runs, so the flow and `dvc repro` can never
disagree and `dvc status` is clean after a flow run. A recipe (and `--set` overrides)
is written to params.yaml first, as `dvc exp run --set-param` does, and the finished run
is saved as a DVC experiment. MLflow gets one parent run per flow run; each stage's
process opens its child run under it (skipped stages get a child run tagged `skipped`).

A run whose data and params are unchanged ends at once in the state "Skipped" ("skipped:
nothing changed"), before MLflow or any stage starts. A run that fails ends in the state
Failed whose message is the one line that names the problem and the fix (the stage's own,
handed over through TUNELINE_ERROR_FILE); no traceback is logged for such errors. Only I/O-bound tasks retry
(writing params, checking sources on the hub, saving the DVC experiment); a stage that
fails is reported, never silently re-run.

`smoke=True` runs the same stages in-process on a tiny slice in `.smoke/<recipe>/`,
logging to the MLflow experiment `smoke`: params.yaml, dvc.lock, the pipeline's outputs
and the model registry are left alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from prefect import flow, runtime, task
from prefect.states import Completed, Failed, State

from flows.dvc_tasks import changed_inputs, outdated_stages, reproduce, save_experiment
from tuneline import ROOT, gitcheck, preflight, recipes, serving
from tuneline.config import Params
from tuneline.errors import INTERRUPTED, TunelineError
from tuneline.io import rewrite_user_file
from tuneline.params_file import read_yaml
from tuneline.stages import stage_names
from tuneline.tracking import PARENT_ENV, start_parent


class _OneLine(logging.Filter):
    """A TunelineError already says what to fix in one line: Prefect logs it without the
    traceback (and without the "NoneType: None" of a task that returned a Failed state).
    A stage's Failed state is logged by "Finished in state Failed('…')" (the task's and the
    flow's): Prefect's "Task run failed with state: Failed(message='…', type=FAILED, result=…)"
    before them said the same line a third time, and the command's `error:` a fourth."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and (record.exc_info[1] is None or isinstance(record.exc_info[1], TunelineError)):
            record.exc_info, record.exc_text = None, None
        said = record.getMessage()
        return not (said.startswith("Task run failed with state: ") and not said.endswith("Retries are exhausted"))


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_OneLine())


@task(name="smoke-stage", task_run_name="{name} (smoke)")
def in_process(name: str, params: Params) -> str:
    from tuneline.stages import run_stage

    run_stage(name, params)
    return "ran"


def _transient(task, task_run, state) -> bool:
    """Retry I/O failures, never a one-line user error (a read-only file stays read-only)."""
    return not isinstance(state.result(raise_on_failure=False), TunelineError)


@task(
    name="write-params",
    task_run_name="write params.yaml",
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=_transient,
)
def write_params(params: Params, header: str) -> bool:
    """Write params.yaml if its values differ (a nightly run of the same recipe leaves the
    file, and so `git diff`, alone). Returns whether it was written."""
    path = ROOT / "params.yaml"
    try:
        if path.is_file() and read_yaml(path, "params.yaml") == params.model_dump(mode="json"):
            return False
    except TunelineError:  # empty or broken: a recipe replaces it whole
        pass
    rewrite_user_file(path, recipes.dump(params, header))
    return True


@task(name="registry", task_run_name="read champion", retries=3, retry_delay_seconds=5)
def champion_after(parent: str, model_name: str) -> str | None:
    """Which version `champion` points at now, noted on the run (a registry call: I/O,
    retried; the MLflow REST client also retries transient HTTP errors itself)."""
    from mlflow import MlflowClient

    from tuneline import registry

    client = MlflowClient()
    version = registry.champion(client, model_name)
    if version is None:
        return None
    client.set_tag(parent, "tuneline.champion", f"{model_name} v{version.version}")
    return str(version.version)


def _record_skipped(parent: str, name: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_run(parent).info.experiment_id
    run = client.create_run(
        exp,
        tags={
            "mlflow.parentRunId": parent,
            "mlflow.runName": name,
            "tuneline.stage": name,
            "tuneline.kind": "stage",
            "tuneline.status": "skipped: nothing changed",
        },
    )
    client.set_terminated(run.info.run_id, "FINISHED")


SKIPPED = "skipped: nothing changed"


def command(recipe: str | None, overrides: list[str]) -> str:
    """The `tuneline run` line a run's parameters amount to (params.yaml header, DVC record)."""
    return " ".join(["tuneline run", *([f"--recipe {recipe}"] if recipe else []), *(f"--set {o}" for o in overrides)])


@flow(name="tuneline-pipeline", log_prints=True)
def pipeline(recipe: str | None = None, overrides: list[str] | None = None, smoke: bool = False):
    """Run prepare → tokenize → train → evaluate → register, skipping what is up to date.

    recipe: a recipes/<name>.yaml (None: params.yaml as it is); overrides: `key=value`
    strings applied on top; smoke: a tiny in-process run that touches nothing of the real one.
    Returns {stage: 'ran' | 'skipped'}; a run with nothing to do ends in the state Skipped,
    one that fails in the state Failed with the error's one line as its message.
    """
    from tuneline.errors import from_os_error
    from tuneline.signals import stacks_on_request

    stacks_on_request()  # also in a scheduled run's own process (the Prefect runner's child)
    try:
        return _pipeline(recipe, list(overrides or []), smoke)
    except TunelineError as e:
        return Failed(message=str(e), data={"exit_code": 2})
    except KeyboardInterrupt:  # Ctrl-C outside a stage process (a stage reports its own, exit 130)
        return Failed(message=INTERRUPTED, data={"exit_code": 130})
    except OSError as e:  # a full disk or read-only project while writing params.yaml or dvc.lock
        known = from_os_error(e, "tuneline run")
        if known is None:
            raise
        return Failed(message=str(known), data={"exit_code": 2})


def _pipeline(recipe: str | None, overrides: list[str], smoke: bool):
    base = None
    if not recipe:
        path = ROOT / "params.yaml"
        if not path.is_file():
            raise TunelineError("params.yaml not found", "run from the project root, or pass --recipe NAME")
        base = read_yaml(path, "params.yaml")
    params = recipes.build(recipe, overrides, smoke, base)  # validate before any work
    preflight.check(params)  # the model, LoRA targets, the registered name, the store: before params.yaml is written
    serving.check_champion_task(params)  # register.model_name's champion is a model for this task
    if not smoke:  # the run ends as a DVC experiment, which stashes what git tracks
        gitcheck.check_untracked_state(ROOT)
    forced: dict[str, str] = {}
    status: dict[str, str] = {}
    path = ROOT / "params.yaml"
    previous = path.read_text() if path.is_file() else None
    wrote, result = False, None
    try:
        if not smoke:
            if recipe or overrides:
                wrote = write_params(
                    params,
                    f"Written by `{command(recipe, overrides)}` ({time.strftime('%Y-%m-%d %H:%M')}).\n"
                    "Edit it and run `tuneline run` or `dvc repro`; `git diff params.yaml` shows the change.",
                )
            forced = changed_inputs(params)
            if not forced and not outdated_stages():
                print(f"[tuneline] {SKIPPED}: data, params and code match dvc.lock; nothing trained")
                result = Completed(name="Skipped", message=SKIPPED, data={name: "skipped" for name in stage_names()})
                return result
        result = _execute(params, recipe, overrides, smoke, forced, status)
        return result
    finally:
        # Refused before any stage finished (bad data, a stage's own check, Ctrl-C): the
        # values that were refused do not stay in params.yaml; nothing was built with them.
        refused = result is None or (isinstance(result, State) and result.is_failed())
        if wrote and previous is not None and refused and "ran" not in status.values():
            rewrite_user_file(path, previous)


def tag_request(client, parent: str, recipe: str | None, overrides: list[str]) -> None:
    """The flow's parameters, as Prefect shows them, on the MLflow run too: never a secret
    (a `--set` value may hold a URI with a password, or a token)."""
    from tuneline.secrets import redact

    client.set_tag(parent, "tuneline.recipe", recipe or "params.yaml")
    client.set_tag(parent, "tuneline.overrides", redact(" ".join(overrides)))
    flow_run = runtime.flow_run.get_id()
    if flow_run:
        client.set_tag(parent, "prefect.flow_run_id", flow_run)


def _execute(
    params: Params, recipe: str | None, overrides: list[str], smoke: bool, forced: dict[str, str], status: dict
):
    """Run the stages in order, recording each one's 'ran' or 'skipped' in `status`."""
    from mlflow import MlflowClient

    parent = start_parent(params, "smoke" if smoke else "prefect")
    client = MlflowClient()
    tag_request(client, parent, recipe, overrides)
    # Stage processes find the parent through the environment.
    os.environ[PARENT_ENV] = parent
    os.environ[preflight.PASSED_ENV] = preflight.key(params)  # checked in _pipeline, not again per stage
    t0, cwd = time.time(), os.getcwd()
    try:
        if smoke:
            work = ROOT / ".smoke" / (recipe or "params")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            os.chdir(work)  # stages write relative paths: data/, models/, metrics/ land here
            for name in stage_names():
                status[name] = in_process(name, params)
        else:
            for name in stage_names():
                if name in forced:
                    print(f"[tuneline] {forced[name]}: running {name} again")
                state = reproduce(name, name in forced, return_state=True)
                if state.is_crashed():  # Ctrl-C reached this process while DVC started the stage
                    raise KeyboardInterrupt
                if state.is_failed():  # the stage's one line becomes the flow run's message
                    client.set_tag(
                        parent,
                        "tuneline.stages",
                        ", ".join([*(f"{k}={v}" for k, v in status.items()), f"{name}=failed"]),
                    )
                    client.set_terminated(parent, "FAILED")
                    return Failed(message=state.message, data=state.result(raise_on_failure=False))
                status[name] = state.result()
                if status[name] == "skipped":
                    _record_skipped(parent, name)
            if not params.register.dry_run:
                champ = champion_after(parent, params.register.model_name)
                print(f"[tuneline] champion: {f'{params.register.model_name} v{champ}' if champ else 'none yet'}")
    except BaseException:
        client.set_terminated(parent, "FAILED")
        raise
    finally:
        os.chdir(cwd)
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(preflight.PASSED_ENV, None)
    client.set_tag(parent, "tuneline.stages", ", ".join(f"{k}={v}" for k, v in status.items()))
    client.log_metric(parent, "pipeline_wall_s", time.time() - t0)
    if not smoke and "ran" in status.values():
        exp = save_experiment(f"{recipe or 'params'}-{time.strftime('%Y%m%d-%H%M%S')}", command(recipe, overrides))
        if exp:
            client.set_tag(parent, "dvc.experiment", exp)
    client.set_terminated(parent, "FINISHED")
    return status


if __name__ == "__main__":
    print(pipeline())
