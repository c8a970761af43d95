"""The DVC experiment queue under a sweep (tuneline/sweep_queue.py): its status read right,
a failed arm's own error line, and the winner applied over the workspace as it is now."""

import sys

import pytest
import yaml

from tuneline import sweep_queue
from tuneline.errors import TunelineError


def test_a_failed_arm_is_reported_with_its_stages_own_line_not_dvcs():
    log = (
        "Running stage 'train':\n> python -m tuneline.stages train\n"
        "error: data file 'x.csv' not found. Fix: check the path\n"
        "ERROR: failed to reproduce 'train': failed to run: python -m tuneline.stages train, exited with 2\n"
    )
    assert sweep_queue.failure(log) == "error: data file 'x.csv' not found. Fix: check the path"
    assert sweep_queue.failure(log.replace(". Fix: check the path", "")).startswith(
        "ERROR: failed to reproduce 'train'"
    )
    assert sweep_queue.failure("") == "no log"


def test_queue_status_prefers_an_arm_queued_again_over_its_failed_row(monkeypatch):
    table = (
        "Task     Name      Created    Status\n"
        "1a2b3c4  s-2  12:38 PM   Running\n"
        "77d2f04  s-3  12:38 PM   Queued\n"
        "ace4715  s-2  12:38 PM   Failed\n"
        "2b61b8f  s-1  12:38 PM   Success\n\n"
        "Worker status: 1 active, 0 idle\n"
    )
    monkeypatch.setattr(sweep_queue, "run_dvc", lambda *a, **k: table)
    assert sweep_queue.queue_status() == {"s-2": "Running", "s-3": "Queued", "s-1": "Success", sweep_queue.WORKERS: "1"}


def _repo(tmp_path):
    """A git + DVC repo in tmp_path: its `git` and a `commit(files, message)` -> sha."""
    import subprocess

    def git(*args: str) -> str:
        ident = ["-c", "user.name=t", "-c", "user.email=t@t"]
        return subprocess.run(["git", *ident, *args], cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    def commit(files: dict[str, str], message: str) -> str:
        write(files)
        git("add", "-A")
        git("commit", "-qm", message)
        return git("rev-parse", "HEAD").strip()

    def write(files: dict[str, str]) -> None:
        for path, text in files.items():
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text(text)

    git("init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    return git, commit, write


def test_the_winner_is_applied_over_the_code_as_it_is_now(tmp_path):
    """Only the experiment's own changes (params, dvc.lock, metrics) and its outputs reach the
    workspace; code committed since its arm was queued stays (`dvc exp apply` reverted it)."""
    git, commit, _ = _repo(tmp_path)
    baseline = commit({"code.py": "v = 1\n", "params.yaml": "lr: 1\n"}, "baseline")
    arm = commit({"params.yaml": "lr: 2\n", "metrics/validate.json": "{}\n"}, "the arm")
    git("update-ref", f"refs/exps/{baseline[:2]}/{baseline[2:]}/sweep-t-1", arm)
    git("reset", "-q", "--hard", baseline)
    head = commit({"code.py": "v = 2\n", "NOTES.md": "a fix\n"}, "a fix, committed mid-sweep")

    changed = sweep_queue.apply("sweep-t-1", tmp_path, (sys.executable, "-m", "dvc"))
    assert sorted(changed) == ["metrics/validate.json", "params.yaml"]
    assert (tmp_path / "params.yaml").read_text() == "lr: 2\n"  # the winner's
    assert (tmp_path / "code.py").read_text() == "v = 2\n" and (tmp_path / "NOTES.md").is_file()  # today's
    assert git("rev-parse", "HEAD").strip() == head
    with pytest.raises(TunelineError, match="experiment 'sweep-t-9' not found"):
        sweep_queue.apply("sweep-t-9", tmp_path, (sys.executable, "-m", "dvc"))


def test_applying_the_winner_keeps_the_workspaces_record_of_the_stages_no_arm_runs(tmp_path):
    """A finished sweep run again: the workspace already holds its winner, evaluated and
    registered. The arm's dvc.lock (train and validate) comes in; evaluate's and register's
    entries and outputs stay the workspace's, so DVC sees nothing to re-run."""
    git, commit, write = _repo(tmp_path)

    def lock(**stages) -> str:
        entries = {s: {"cmd": s, "outs": [{"path": out, "md5": md5}]} for s, (out, md5) in stages.items()}
        return yaml.safe_dump({"schema": "2.0", "stages": entries}, sort_keys=False)

    baseline = commit({"params.yaml": "lr: 1\n", "dvc.lock": lock(train=("models", "m0"))}, "baseline")
    # the arm started from a workspace whose eval.json (and its lock entry) a later run replaced
    arm = commit(
        {
            "params.yaml": "lr: 2\n",
            "dvc.lock": lock(train=("models", "m2"), evaluate=("metrics/eval.json", "e-old")),
            "metrics/eval.json": "old\n",
        },
        "the arm",
    )
    git("update-ref", f"refs/exps/{baseline[:2]}/{baseline[2:]}/sweep-t-1", arm)
    git("reset", "-q", "--hard", baseline)
    write(
        {
            "dvc.lock": lock(train=("models", "m2"), evaluate=("metrics/eval.json", "e-new")),
            "metrics/eval.json": "new\n",
        }
    )

    changed = sweep_queue.apply("sweep-t-1", tmp_path, (sys.executable, "-m", "dvc"), keep=["evaluate", "register"])
    assert sorted(changed) == ["dvc.lock", "params.yaml"]
    stages = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
    assert stages["train"]["outs"][0]["md5"] == "m2"  # the arm's
    assert stages["evaluate"]["outs"][0]["md5"] == "e-new" and "register" not in stages  # the workspace's
    assert (tmp_path / "metrics/eval.json").read_text() == "new\n"
    assert (tmp_path / "params.yaml").read_text() == "lr: 2\n"
