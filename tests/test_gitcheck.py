import subprocess

import pytest

from tuneline import gitcheck
from tuneline.errors import TunelineError


def git(root, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True, capture_output=True
    )


def test_tracked_local_state_is_named_and_the_fix_untracks_exactly_it(tmp_path):
    git(tmp_path, "init", "-q")
    for name in ("mlflow.db", "params.yaml", "mlflow.db.bak", ".prefect/prefect.db", "checkpoints-notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    git(tmp_path, "add", "params.yaml", "mlflow.db.bak", "checkpoints-notes.txt")
    assert gitcheck.tracked_state(tmp_path) == []  # look-alike names are not the state
    gitcheck.check_untracked_state(tmp_path)
    git(tmp_path, "add", "mlflow.db", ".prefect")
    assert gitcheck.tracked_state(tmp_path) == ["mlflow.db", ".prefect"]
    with pytest.raises(TunelineError, match=r"local state \(mlflow.db, .prefect\)") as e:
        gitcheck.check_untracked_state(tmp_path)
    git(tmp_path, *e.value.fix.split("`")[1].split()[1:])  # the fix's own command
    assert gitcheck.tracked_state(tmp_path) == []


def test_outside_git_nothing_is_tracked_but_a_sweep_needs_a_repository_with_a_commit(tmp_path):
    assert gitcheck.tracked_state(tmp_path) == []
    with pytest.raises(TunelineError, match="not a git repository"):
        gitcheck.check_committed(tmp_path)
    git(tmp_path, "init", "-q")
    with pytest.raises(TunelineError, match=r"no git commit yet.*git add -A && git commit -m start"):
        gitcheck.check_committed(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "start")
    gitcheck.check_committed(tmp_path)


def test_a_machine_without_git_runs_as_outside_a_repository_and_a_sweep_says_to_install_it(tmp_path, monkeypatch):
    # Slim containers (a GPU image, say) often have no git: a run must not die on it.
    git(tmp_path, "init", "-q")
    (tmp_path / "mlflow.db").write_text("x")
    git(tmp_path, "add", "mlflow.db")
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert gitcheck.tracked_state(tmp_path) == []
    gitcheck.check_untracked_state(tmp_path)
    with pytest.raises(TunelineError, match="no `git` command") as e:
        gitcheck.check_committed(tmp_path)
    assert e.value.fix.startswith("install git, then `git init && git add -A")
