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

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prefect import flow, runtime, task
from prefect.states import Completed, Failed, State

from tuneline import ROOT, preflight, recipes
from tuneline.config import Params, read_yaml
from tuneline.data import LINEAGE, TOKENIZED_META
from tuneline.errors import TunelineError
from tuneline.io import read_json, rewrite_user_file
from tuneline.stages import ERROR_FILE, stage_names
from tuneline.tracking import PARENT_ENV, start_parent


class _OneLine(logging.Filter):
    """A TunelineError already says what to fix in one line: Prefect logs it without the
    traceback (and without the "NoneType: None" of a task that returned a Failed state)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and (record.exc_info[1] is None or isinstance(record.exc_info[1], TunelineError)):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_OneLine())


@contextlib.contextmanager
def sigint_held_for_stages():
    """Stage processes started inside this block (from this thread) start with SIGINT
    blocked; `stages.main` unblocks it inside its own error handling. So a Ctrl-C while a
    stage is still starting up stays pending until it can become the one "interrupted"
    line, instead of a KeyboardInterrupt traceback from an import.

    A signal mask survives fork and exec, but not every shell passes it on: DVC runs a
    stage's cmd with `$SHELL -c` (/bin/sh when unset), and dash, Debian's /bin/sh, clears
    the mask when it starts. bash keeps it, so DVC is pointed at bash where there is one."""
    masked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    shell = os.environ.get("SHELL")
    bash = shutil.which("bash")
    if bash:
        os.environ["SHELL"] = bash
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, masked)
        if shell is None:
            os.environ.pop("SHELL", None)
        else:
            os.environ["SHELL"] = shell


def heal_rwlock(root: Path = ROOT) -> bool:
    """Remove DVC's `.dvc/tmp/rwlock` when it is not valid JSON: DVC rewrites it in place, so a
    Ctrl-C that lands in that write leaves it half-written, and every later DVC command then
    fails with RWLockFileCorruptedError. Runs under the project lock (no other tuneline run
    here), and a corrupted file holds no lock anyone can use. Returns whether it removed it."""
    import json

    path = root / ".dvc" / "tmp" / "rwlock"
    try:
        json.loads(path.read_text())
        return False
    except FileNotFoundError:
        return False
    except ValueError:
        path.unlink(missing_ok=True)
        print("[tuneline] removed .dvc/tmp/rwlock, left half-written by an interrupted run", flush=True)
        return True


@task(name="stage", task_run_name="{name}")
def reproduce(name: str, force: bool = False) -> str | State:
    """Reproduce one stage if its inputs changed; returns 'ran' or 'skipped', or a Failed
    state carrying the stage's one-line error and exit code."""
    from dvc.exceptions import DvcException, ReproductionError
    from dvc.repo import Repo

    logging.getLogger("dvc").propagate = False  # DVC prints its own progress; don't echo it twice
    heal_rwlock()
    fd, err_file = tempfile.mkstemp(prefix=f"tuneline-{name}-", suffix=".err")
    os.close(fd)
    os.environ[ERROR_FILE] = err_file  # the stage process writes its one-line error here
    # dvc.yaml's `python -m tuneline.stages` must be this interpreter, the one with tuneline's
    # stack, also under `.venv/bin/tuneline` from a shell without the venv on PATH.
    here = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != here:
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    try:
        with sigint_held_for_stages(), Repo(str(ROOT)) as repo:
            repo.scm_context.quiet = True  # not "To track the changes with git, run: ..." after every stage
            ran = repo.reproduce(name, single_item=True, force=force)
    except ReproductionError as e:
        code, _, line = Path(err_file).read_text().partition("\n")
        if not line.strip():  # DVC failed around the stage (e.g. a read-only output), or it was killed
            from tuneline.errors import from_os_error

            cause = e.__cause__ or e.__context__
            known = from_os_error(cause, name) if cause is not None else None
            code, line = (
                ("2", str(known))
                if known
                else ("130", f"{name}: {INTERRUPTED}")
                if re.search(r"exited with (-2|130)$", str(cause))  # SIGINT ended it before it could say so
                else (
                    "1",
                    f"stage '{name}' failed ({' '.join(str(cause).split())[:200]}). "
                    "Fix: see its output above, then re-run",
                )
            )
        return Failed(message=line.strip(), data={"stage": name, "exit_code": int(code)})
    except DvcException as e:
        raise TunelineError(
            f"dvc: {' '.join(str(e).split())[:300]}", "fix dvc.yaml / params.yaml as the message says"
        ) from None
    finally:
        os.environ.pop(ERROR_FILE, None)
        Path(err_file).unlink(missing_ok=True)
    return "ran" if ran else "skipped"


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


@task(name="check-sources", task_run_name="check sources", retries=3, retry_delay_seconds=10)
def changed_inputs(params: Params) -> dict[str, str]:
    """Stages DVC cannot see are stale, with why: {stage: reason}. I/O-bound (hashes data
    files, asks the hub for a dataset's head revision), hence the retries."""
    forced = {}
    why = _source_changed()
    if why:
        forced["prepare"] = why
    if _tokenizer_changed(params):
        forced["tokenize"] = "the tokenizer changed since the last tokenize"
    return forced


@task(name="dvc-status", task_run_name="dvc status")
def outdated_stages() -> list[str]:
    """Stages whose deps, params or outs differ from dvc.lock (what `dvc status` lists)."""
    import logging

    from dvc.repo import Repo

    logging.getLogger("dvc").propagate = False
    heal_rwlock()
    with Repo(str(ROOT)) as repo:
        status = repo.status()
    return [name for name in stage_names() if any(key.split(":")[-1] == name for key in status)]


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


def _tokenizer_changed(params: Params) -> bool:
    """Token data made with another tokenizer (e.g. a local model folder whose tokenizer
    files changed under the same name) must be rebuilt, though no DVC dep changed."""
    meta = ROOT / TOKENIZED_META
    folder = ROOT / Path(params.model.name).expanduser()
    if not meta.is_file() or not folder.is_dir():  # built-ins ship in pinned packages; hub ids have revisions
        return False
    from tuneline.modeling import load_tokenizer
    from tuneline.tokenization import tokenizer_hash

    return read_json(meta).get("tokenizer_sha256") != tokenizer_hash(load_tokenizer(params.model.name))


def _source_changed() -> str | None:
    """Why the prepared data is stale though no DVC dep changed, or None: a local data file
    edited in place (its recorded hash tells), or a hub dataset with a new head revision."""
    lineage = ROOT / LINEAGE
    if not lineage.is_file():
        return None
    from tuneline import sources

    for rec in read_json(lineage).values():
        spec = rec["source"]
        if spec.startswith("hf:"):
            if os.environ.get("HF_HUB_OFFLINE") == "1":
                print(f"[tuneline] note: the hub is off (HF_HUB_OFFLINE=1): not checking '{spec}' for a new revision")
                continue
            try:
                now = sources.hub_revision(spec)
            except TunelineError:
                raise
            except Exception as e:  # network: the task retries, then fails with this line
                raise TunelineError(
                    f"cannot ask the hub for the revision of '{spec}' ({type(e).__name__})",
                    "check the network and HF_TOKEN, or pin the source with @<revision>",
                ) from None
            if now and now != rec.get("revision"):
                return f"'{spec}' has a new revision {now[:12]} (was {str(rec.get('revision'))[:12]})"
            continue
        try:
            if sources.file_hashes(spec) != rec.get("sha256"):
                return f"the data file(s) of '{spec}' changed"
        except TunelineError:
            return None  # a vanished file: prepare itself reports it
    return None


@task(name="save-experiment", task_run_name="save DVC experiment")
def save_experiment(name: str, command: str) -> str | None:
    """Record the workspace (params, dvc.lock, metrics) as a DVC experiment; the command
    with the flow's parameters is its commit message (`dvc exp show` has the values)."""
    env = os.environ | {k: os.environ.get(k, "tuneline") for k in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME")}
    env |= {k: os.environ.get(k, "tuneline@localhost") for k in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL")}
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "save", "--force", "-n", name, "-m", command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        print(
            f"[tuneline] note: not saved as a DVC experiment ({(proc.stderr or proc.stdout).strip().splitlines()[-1:]})"
        )
        return None
    return name


SKIPPED = "skipped: nothing changed"
INTERRUPTED = "interrupted. Fix: re-run the same command; finished stages and checkpoints are reused"


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
