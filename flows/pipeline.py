"""The pipeline as a Prefect flow: one task per DVC stage, in dvc.yaml's order.

Each task asks DVC to reproduce its one stage: DVC skips it when deps and params are
unchanged and records dvc.lock when it runs, so the flow and `dvc repro` can never
disagree and `dvc status` is clean after a flow run. A recipe (and `--set` overrides)
is written to params.yaml first, as `dvc exp run --set-param` does, and the finished run
is saved as a DVC experiment. MLflow gets one parent run per flow run; each stage's
process opens its child run under it (skipped stages get a child run tagged `skipped`).

`smoke=True` runs the same stages in-process on a tiny slice in `.smoke/<recipe>/`,
logging to the MLflow experiment `smoke`: params.yaml, dvc.lock, the pipeline's outputs
and the model registry are left alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import yaml
from prefect import flow, task

from tuneline import ROOT, recipes
from tuneline.config import Params
from tuneline.errors import TunelineError
from tuneline.io import read_json, write_text
from tuneline.stages import stage_names
from tuneline.tracking import PARENT_ENV, start_parent


@task(name="stage", task_run_name="{name}")
def run_stage(name: str, force: bool = False) -> str:
    """Reproduce one stage if its inputs changed; returns 'ran' or 'skipped'."""
    import logging

    from dvc.exceptions import DvcException, ReproductionError
    from dvc.repo import Repo

    logging.getLogger("dvc").propagate = False  # DVC prints its own progress; don't echo it twice
    try:
        with Repo(str(ROOT)) as repo:
            ran = repo.reproduce(name, single_item=True, force=force)
    except ReproductionError:
        # The stage printed its own one-line error; this names where it happened.
        raise TunelineError(f"stage '{name}' failed (its error is printed above)",
                            "fix the cause, then re-run: finished stages are reused") from None
    except DvcException as e:
        raise TunelineError(f"dvc: {' '.join(str(e).split())[:300]}", "fix dvc.yaml / params.yaml as the message says") from None
    return "ran" if ran else "skipped"


@task(name="smoke-stage", task_run_name="{name} (smoke)")
def run_stage_here(name: str, params: Params) -> str:
    from tuneline.stages import run_stage as run_in_process

    run_in_process(name, params)
    return "ran"


@task(name="write-params", retries=2, retry_delay_seconds=1)
def write_params(params: Params, header: str) -> None:
    write_text(ROOT / "params.yaml", recipes.dump(params, header))


def _record_skipped(parent: str, name: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_run(parent).info.experiment_id
    run = client.create_run(exp, tags={"mlflow.parentRunId": parent, "mlflow.runName": name,
                                       "tuneline.stage": name, "tuneline.kind": "stage",
                                       "tuneline.status": "skipped: nothing changed"})
    client.set_terminated(run.info.run_id, "FINISHED")


def _tokenizer_changed(params: Params) -> bool:
    """Token data made with another tokenizer (e.g. a local model folder whose tokenizer
    files changed under the same name) must be rebuilt, though no DVC dep changed."""
    meta = ROOT / "data" / "tokenized" / "meta.json"
    if not meta.is_file():
        return False
    from components.tokenize import tokenizer_hash
    from tuneline.modeling import load_tokenizer

    return read_json(meta).get("tokenizer_sha256") != tokenizer_hash(load_tokenizer(params.model.name))


def _source_changed() -> bool:
    """A local data file edited in place changes no DVC dep; its recorded hash tells."""
    lineage = ROOT / "data" / "prepared" / "lineage.json"
    if not lineage.is_file():
        return False
    from tuneline import sources

    try:
        return any(sources.file_hashes(rec["source"]) not in (None, rec.get("sha256"))
                   for rec in read_json(lineage).values())
    except TunelineError:
        return False  # a vanished file: prepare itself reports it


def _save_experiment(name: str) -> str | None:
    """Record the workspace (params, dvc.lock, metrics) as a DVC experiment."""
    env = os.environ | {k: os.environ.get(k, "tuneline") for k in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME")}
    env |= {k: os.environ.get(k, "tuneline@localhost") for k in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL")}
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "save", "--force", "-n", name],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        print(f"[tuneline] note: not saved as a DVC experiment ({(proc.stderr or proc.stdout).strip().splitlines()[-1:]})")
        return None
    return name


@flow(name="tuneline-pipeline", log_prints=True)
def pipeline(recipe: str | None = None, overrides: list[str] | None = None, smoke: bool = False) -> dict[str, str]:
    """Run prepare → tokenize → train → evaluate → register, skipping what is up to date.

    recipe: a recipes/<name>.yaml (None: params.yaml as it is); overrides: `key=value`
    strings applied on top; smoke: a tiny in-process run that touches nothing of the real one.
    """
    from mlflow import MlflowClient

    overrides = list(overrides or [])
    base = None
    if not recipe:
        path = ROOT / "params.yaml"
        if not path.is_file():
            raise TunelineError("params.yaml not found", "run from the project root, or pass --recipe NAME")
        base = yaml.safe_load(path.read_text()) or {}
    params = recipes.build(recipe, overrides, smoke, base)  # validate before any work
    if (recipe or overrides) and not smoke:
        what = " ".join([f"--recipe {recipe}" if recipe else "", *(f"--set {o}" for o in overrides)]).strip()
        write_params(params, f"Written by `tuneline run {what}` ({time.strftime('%Y-%m-%d %H:%M')}).\n"
                             "Edit it and run `tuneline run` or `dvc repro`; `git diff params.yaml` shows the change.")
    parent = start_parent(params, "smoke" if smoke else "prefect")
    client = MlflowClient()
    client.set_tag(parent, "tuneline.recipe", recipe or "params.yaml")
    client.set_tag(parent, "tuneline.overrides", " ".join(overrides))
    # Stage processes find the parent through the environment; `python` must be this one.
    os.environ[PARENT_ENV] = parent
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    status: dict[str, str] = {}
    t0, cwd = time.time(), os.getcwd()
    try:
        if smoke:
            work = ROOT / ".smoke" / (recipe or "params")
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            os.chdir(work)  # stages write relative paths: data/, models/, metrics/ land here
            for name in stage_names():
                status[name] = run_stage_here(name, params)
        else:
            for name in stage_names():
                force = (name == "prepare" and _source_changed()) or (name == "tokenize" and _tokenizer_changed(params))
                if force:
                    print(f"[tuneline] {'a data file' if name == 'prepare' else 'the tokenizer'} changed since "
                          f"the last {name}: running it again")
                status[name] = run_stage(name, force)
                if status[name] == "skipped":
                    _record_skipped(parent, name)
    except BaseException:
        client.set_terminated(parent, "FAILED")
        raise
    finally:
        os.chdir(cwd)
        os.environ.pop(PARENT_ENV, None)
    client.set_tag(parent, "tuneline.stages", ", ".join(f"{k}={v}" for k, v in status.items()))
    client.log_metric(parent, "pipeline_wall_s", time.time() - t0)
    if not smoke and "ran" in status.values():
        exp = _save_experiment(f"{recipe or 'params'}-{time.strftime('%Y%m%d-%H%M%S')}")
        if exp:
            client.set_tag(parent, "dvc.experiment", exp)
    client.set_terminated(parent, "FINISHED")
    return status


if __name__ == "__main__":
    print(pipeline())
