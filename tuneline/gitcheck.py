"""What DVC's experiments need of the project's git repository, checked before a run.

`tuneline run` saves each run as a DVC experiment (`dvc exp save`) and a sweep queues its
arms as experiments (`dvc exp run --queue`). Both stash and restore the files git tracks.
When git tracks the project's local state (mlflow.db, .prefect/, ...), that swaps the
MLflow and Prefect databases under the processes that have them open. Seen: the run
trained, evaluated and registered, then ended in "unexpected MlflowException: attempt to
write a readonly database". A sweep also needs a first commit, to hold its arms.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tuneline.errors import TunelineError

# The project's own state, kept out of git by the shipped .gitignore: the MLflow store and
# artifacts, Prefect's database, caches and locks, resume checkpoints, DVC's site cache.
LOCAL_STATE = ("mlflow.db", "mlartifacts", "mlruns", ".prefect", ".cache", "checkpoints", ".dvc/site-cache")
FIRST_COMMIT = "git add -A && git commit -m start"  # what a project with no commit runs once
NO_GIT = 127  # the shell's code for a command that is not found


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`git ARGS` in `root`; a machine without git (a slim container) answers NO_GIT, so a
    run there goes on as outside a repository instead of failing."""
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    except FileNotFoundError:
        return subprocess.CompletedProcess(["git", *args], NO_GIT, "", "git: command not found")


def tracked_state(root: Path) -> list[str]:
    """The LOCAL_STATE paths git tracks something in ([] outside a git repository)."""
    out = _git(root, "ls-files", "--", *LOCAL_STATE)
    if out.returncode != 0:
        return []
    files = out.stdout.splitlines()
    return [p for p in LOCAL_STATE if any(f == p or f.startswith(p + "/") for f in files)]


def check_untracked_state(root: Path) -> None:
    """Refuse to start while git tracks local state (see the module's docstring)."""
    tracked = tracked_state(root)
    if tracked:
        names = " ".join(tracked)
        raise TunelineError(
            f"git tracks the project's local state ({', '.join(tracked)}): DVC's experiments would "
            "swap the MLflow and Prefect databases under the running pipeline",
            f"list them in .gitignore (as the shipped one does), then `git rm -r --cached {names}` and commit",
        )


def commit_missing(root: Path) -> tuple[str, str] | None:
    """(what the project lacks, how to make it, with the command in backticks) when it has
    no git commit; None when it has one."""
    inside = _git(root, "rev-parse", "--is-inside-work-tree").returncode
    if inside == NO_GIT:
        return "cannot use git (no `git` command here)", f"install git, then `git init && {FIRST_COMMIT}`"
    if inside != 0:
        return "is not a git repository", f"`git init && {FIRST_COMMIT}`"
    if _git(root, "rev-parse", "--verify", "-q", "HEAD").returncode != 0:
        return "has no git commit yet", f"`{FIRST_COMMIT}`"
    return None


def check_committed(root: Path) -> None:
    """Refuse a project with no commit: DVC's experiments are commits on top of one."""
    missing = commit_missing(root)
    if missing:
        what, fix = missing
        raise TunelineError(
            f"the project {what}, and each arm of a sweep is a DVC experiment (a git commit on top of one)",
            f"{fix} in the project, then sweep",
        )
