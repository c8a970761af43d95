"""The pipeline flow's DVC side: reproduce one stage through DVC, ask `dvc status`, save a
finished run as a DVC experiment, and find the stale inputs DVC cannot see (a data file
edited in place, a hub dataset's new revision, a local model's changed tokenizer).

`reproduce` hands DVC the stage with SIGINT held until the stage process can answer it
(`sigint_held_for_stages`), reads the stage's one-line error back from TUNELINE_ERROR_FILE,
and repairs the lock file an earlier Ctrl-C may have left half-written (`heal_rwlock`).
Used by flows/pipeline.py and flows/sweep.py.
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
from pathlib import Path

from prefect import task
from prefect.exceptions import TerminationSignal
from prefect.states import Failed, State

from tuneline import ROOT, gitcheck
from tuneline.config import Params
from tuneline.data import BASE_META, LINEAGE, TOKENIZED_META
from tuneline.errors import INTERRUPTED, TunelineError, dvc_message
from tuneline.io import read_json
from tuneline.stages import ERROR_FILE, stage_names


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
    # The stage process writes its one-line error here. It lives in the project's DVC scratch
    # folder, one per stage (the project lock lets one run in at a time): a SIGKILL that skips
    # the `finally` below leaves it for the next run to overwrite, not one more file in /tmp.
    err_file = ROOT / ".dvc" / "tmp" / f"tuneline-{name}.err"
    err_file.parent.mkdir(parents=True, exist_ok=True)
    err_file.write_text("")
    os.environ[ERROR_FILE] = str(err_file)
    # dvc.yaml's `python -m tuneline.stages` must be this interpreter, the one with tuneline's
    # stack, also under `.venv/bin/tuneline` from a shell without the venv on PATH.
    here = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != here:
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    try:
        with sigint_held_for_stages(), Repo(str(ROOT)) as repo:
            repo.scm_context.quiet = True  # not "To track the changes with git, run: ..." after every stage
            # dvc.yaml by its full path: DVC reads a bare stage name in the working directory's
            # dvc.yaml, and `tuneline run` may be typed in a subfolder of the project
            ran = repo.reproduce(f"{ROOT / 'dvc.yaml'}:{name}", single_item=True, force=force)
    except ReproductionError as e:
        code, _, line = err_file.read_text().partition("\n")
        if not line.strip():  # DVC failed around the stage (e.g. a read-only output), or it was killed
            from tuneline.errors import known

            cause = e.__cause__ or e.__context__
            fixable = known(cause, name) if cause is not None else None
            code, line = (
                ("2", str(fixable))
                if fixable
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
    except TerminationSignal:
        _stop_stages()
        raise
    finally:
        os.environ.pop(ERROR_FILE, None)
        err_file.unlink(missing_ok=True)
    return "ran" if ran else "skipped"


def _stop_stages(grace: float = 15.0) -> None:
    """SIGTERM to this process alone (`kill PID`, a cancelled deployment run): inside a flow
    Prefect raises it as TerminationSignal while DVC waits on the stage. A terminal's Ctrl-C
    reaches the stage through the process group; this does not, and the stage trained on
    until this process had exited (its parent-death signal), printing steps after the
    command's "interrupted" line. Interrupt it as Ctrl-C would, and let it say so first."""
    import psutil

    from tuneline.signals import interrupt

    def is_stage(p) -> bool:
        with contextlib.suppress(psutil.Error):
            return "tuneline.stages" in p.cmdline()
        return False

    stages = interrupt(p for p in psutil.Process().children(recursive=True) if is_stage(p))
    psutil.wait_procs(stages, timeout=grace)


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
    if why := _base_changed(params):
        forced["train"] = why
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


def _base_changed(params: Params) -> str | None:
    """Why the trained model is stale though no DVC dep changed, or None: model.name is a
    local folder whose files changed since train started from it (new weights saved under
    the same path). DVC sees only the name, a param."""
    from tuneline.modeling import identity

    made = ROOT / BASE_META
    if not made.is_file() or read_json(made).get("model") != params.model.name:
        return None  # no train yet, or another model.name: DVC sees that change itself
    if read_json(made).get("identity") != identity(params.model.name):
        return f"the files of model.name '{params.model.name}' changed since the last train"
    return None


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
        why = dvc_message(proc.stderr or proc.stdout)
        if "Empty git repo" in why:  # `git init` and no commit yet: a run still works, DVC cannot save it
            why += f"; commit the project once (`{gitcheck.FIRST_COMMIT}`) to keep each run as one"
        print(f"[tuneline] note: not saved as a DVC experiment ({why})")
        return None
    return name
