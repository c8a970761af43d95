"""A sweep's arms as DVC experiments (#22): queued and run by DVC's own queue worker, watched
through its status and logs, and the winner's changes put back in the workspace. What the
arms are and which one wins is tuneline/sweep.py; the flow is flows/sweep.py, which
watches the arms through flows/sweep_arms.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tuneline.errors import TunelineError, dvc_message
from tuneline.sweep import Arm


def run_dvc(args: list[str], cwd, dvc, check: bool = True) -> str:
    done = subprocess.run([*dvc, *args], cwd=cwd, capture_output=True, text=True)
    if check and done.returncode:
        raise TunelineError(
            f"`dvc {' '.join(args[:3])}` failed: {dvc_message(done.stderr or done.stdout)[-300:]}",
            "see `dvc queue status` and `dvc queue logs NAME`; `dvc queue remove --queued` clears the queue",
        )
    return done.stdout


def untracked(paths: list[str], cwd=None) -> list[str]:
    """What of `paths` git does not track, as `dvc exp run --copy-paths` takes it: a file
    whose folder git tracks something in, else the folder (DVC copies into the experiment's
    copy of the project, which only has the folders git knows)."""
    from pathlib import PurePosixPath

    def tracked(path: str) -> bool:
        out = subprocess.run(["git", "ls-files", "--", path], cwd=cwd, capture_output=True, text=True).stdout
        return bool(out.strip())

    out: list[str] = []
    for path in paths:
        folder = str(PurePosixPath(path).parent)
        if tracked(path):
            continue
        item = path if folder == "." or tracked(folder) else folder
        if item not in out:
            out.append(item)
    return out


def queue(
    arms_: list[Arm], names: list[str], target: str | None = None, cwd=None, dvc=("dvc",), copy: list[str] = ()
) -> None:
    """Queue each arm as a DVC experiment named as given (`dvc exp run --queue --name NAME
    -S key=value ... [target]`). DVC's worker runs them (`start`) and keeps them: `dvc exp
    show` lists each with its params and metrics. A queued experiment starts from git's view
    of the project (the commit and the changes DVC stashes for it): `copy` names what it
    needs that git does not track (`untracked`)."""
    for arm, exp in zip(arms_, names):
        args = ["exp", "run", "--queue", "--name", exp, *(a for path in copy for a in ("--copy-paths", path))]
        for k, v in arm.items():
            args += ["-S", f"{k}={v}"]
        run_dvc(args + ([target] if target else []), cwd, dvc)


STATES = ("Failed", "Success", "Queued", "Running")  # a name queued again has its old rows too: the later state wins


def queue_status(cwd=None, dvc=("dvc",)) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} from `dvc queue status`, and
    under the key WORKERS the number of active workers ('0' when none runs)."""
    import re

    out = run_dvc(["queue", "status"], cwd, dvc)
    status = {}  # rows: task, name, created (two words), status; no --json for this command
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 4 and parts[-1] in STATES:
            if STATES.index(parts[-1]) >= STATES.index(status.get(parts[1], "Failed")):
                status[parts[1]] = parts[-1]
    found = re.search(r"Worker status: (\d+) active", out)
    status[WORKERS] = found.group(1) if found else "0"
    return status


WORKERS = "<workers>"


def start(jobs: int = 1, cwd=None, dvc=("dvc",), env=None) -> None:
    """Start DVC's queue worker(s); they run the queued arms, `jobs` at a time."""
    # The worker DVC spawns outlives this call and keeps the pipes it was given: capturing
    # its output would wait for the whole queue. Its log is `dvc queue logs NAME`.
    done = subprocess.run(
        [*dvc, "queue", "start", "-j", str(jobs)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if done.returncode:
        raise TunelineError("DVC's queue worker did not start", "run `dvc queue start` to see why")


def experiments(cwd=None) -> dict[str, str]:
    """{experiment name: commit} of every DVC experiment in the project (its git refs under
    refs/exps/, whatever commit it was run from)."""
    out = subprocess.run(
        ["git", "for-each-ref", "refs/exps", "--format=%(refname) %(objectname)"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = {}
    for line in out.splitlines():
        ref, _, sha = line.partition(" ")
        if ref.count("/") >= 4 and not ref.startswith(("refs/exps/celery", "refs/exps/exec")):
            found[ref.rsplit("/", 1)[-1]] = sha
    return found


def apply(name: str, cwd, dvc, keep: list[str] = ()) -> list[str]:
    """Put experiment `name`'s own changes in the workspace: the files its commit changed
    from its baseline (params.yaml, dvc.lock, metrics, uncached reports), then its outputs
    from DVC's cache. Returns those files.

    Not `dvc exp apply`: that checks out the experiment's whole tree, so code committed
    since the arm was queued (a sweep resumed after a fix) went back to the arm's version
    in the workspace, and the winner was evaluated and registered with that old code. Here
    the code stays as it is; a stage whose code changed since (evaluate, register: the
    sweep's id covers train's and validate's) is stale to DVC and runs with today's code.

    `keep`: stages the arm did not run (those after its target). Their dvc.lock entries and
    outputs stay the workspace's: DVC then re-runs them only when what they read changed,
    so a finished sweep run again does not evaluate and register its winner twice."""
    rev = experiments(cwd).get(name)
    if rev is None:
        raise TunelineError(f"experiment '{name}' not found", "see `dvc exp show -A`; run the sweep again")

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout

    lock = Path(cwd or ".") / "dvc.lock"
    ours = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}
    kept = {s: ours[s] for s in keep if s in ours}
    kept_outs = {o["path"] for entry in kept.values() for o in entry.get("outs", [])}
    changed = git("diff", "--name-only", "--no-renames", "--diff-filter=AM", f"{rev}^", rev).split()
    changed = [f for f in changed if f not in kept_outs]
    if changed:
        git("restore", f"--source={rev}", "--worktree", "--", *changed)
    if kept and "dvc.lock" in changed:
        theirs = yaml.safe_load(lock.read_text())
        theirs.setdefault("stages", {}).update(kept)
        lock.write_text(yaml.safe_dump(theirs, sort_keys=False))
    run_dvc(["checkout", "--force"], cwd, dvc)
    return changed


def read_at(commit: str, path: str, cwd=None) -> str | None:
    """A file as an experiment committed it (metrics and uncached reports are in git)."""
    done = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=cwd, capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def failure(log: str) -> str:
    """Why an arm failed, from its queue log: the stage's own line (`error: … Fix: …`), not
    DVC's "failed to reproduce 'train'" after it, which says only that the stage exited."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    ours = [line for line in lines if "Fix:" in line]
    return (ours or [line for line in lines if "ERROR" in line] or lines or ["no log"])[-1][:400]


def last_progress(name: str, cwd=None) -> str | None:
    """The newest line a running arm printed (`[train] 41/102 steps (40%) 182 tok/s, ETA
    5m40s`), read from the log file DVC's queue writes for it: no DVC process, so it can be
    asked often beside a training arm. None when the arm has no log yet (or prints nothing).

    DVC's queue keeps each task in .dvc/tmp/exps/run/<task>/: `<task>.run` (the executor's
    info, with the experiment's name) and `<task>.out` (its output; `dvc queue logs`)."""
    import json

    logs = []  # an arm queued again (a resumed sweep) has its old task's log too: the newest is its
    for info in (Path(cwd or ".") / ".dvc" / "tmp" / "exps" / "run").glob("*/*.run"):
        try:
            if json.loads(info.read_text()).get("name") == name:
                out = info.with_suffix(".out")
                logs.append((out.stat().st_mtime, out))
        except (OSError, ValueError):  # written or removed as we read: not this time
            continue
    if not logs:
        return None
    try:
        with open(max(logs)[1], "rb") as f:
            f.seek(max(f.seek(0, 2) - 4096, 0))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in tail.replace("\r", "\n").splitlines()]
    stages = [line for line in lines if line.startswith("[") and "]" in line]
    return stages[-1] if stages else None
