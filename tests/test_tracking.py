import mlflow
import pytest

from tuneline import secrets, tracking
from tuneline.config import Params
from tuneline.errors import TunelineError


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    return mlflow.MlflowClient(uri)


def _runs(client):
    exp = client.get_experiment_by_name("tuneline")
    return client.search_runs([exp.experiment_id])


def test_a_stage_gets_a_child_run_under_a_parent_with_all_params(store):
    with tracking.stage_run("prepare", Params()):
        tracking.log_metrics({"rows": 3})
    runs = _runs(store)
    parent = next(r for r in runs if r.data.tags.get("tuneline.kind") == "pipeline")
    child = next(r for r in runs if r.data.tags.get("tuneline.stage") == "prepare")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.params["train.lr"] == parent.data.params["train.lr"] == "0.002"
    assert child.data.metrics["rows"] == parent.data.metrics["rows"] == 3
    assert child.info.status == parent.info.status == "FINISHED"


def test_a_failed_stage_marks_both_runs_failed(store):
    with pytest.raises(TunelineError):
        with tracking.stage_run("train", Params()):
            raise TunelineError("boom", "fix it")
    assert {r.info.status for r in _runs(store)} == {"FAILED"}


def test_an_interrupted_stage_marks_its_runs_killed_and_never_waits_on_a_locked_store(store, tmp_path):
    """Ctrl-C can land inside an MLflow write and leave SQLite's write lock held: the
    interruption still propagates within the grace period, not after MLflow's retries."""
    import sqlite3
    import time

    with pytest.raises(KeyboardInterrupt):
        with tracking.stage_run("train", Params()):
            raise KeyboardInterrupt
    assert {r.info.status for r in _runs(store)} == {"KILLED"}

    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    try:
        with pytest.raises(KeyboardInterrupt):
            with tracking.stage_run("evaluate", Params()):
                holder.execute("BEGIN IMMEDIATE")  # the write lock a torn write leaves behind
                t = time.time()
                raise KeyboardInterrupt
        assert time.time() - t < tracking.INTERRUPT_GRACE + 3
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        mlflow.end_run()  # the run the interrupted stage left active in this thread


def test_the_flow_parent_is_reused_by_every_stage(store, monkeypatch):
    parent = tracking.start_parent(Params(), "prefect")
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    for stage in ("prepare", "tokenize"):
        with tracking.stage_run(stage, Params()):
            pass
    kids = [r for r in _runs(store) if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.data.tags["tuneline.stage"] for r in kids) == ["prepare", "tokenize"]


def test_a_run_whose_process_died_is_marked_killed_when_the_next_pipeline_starts(store):
    """SIGKILL or a power cut ends no run: the next execution on this machine ends them, and
    leaves alone the runs of a live process and those of another machine."""
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner = tracking._owner(__import__("psutil").Process(dead.pid))
    dead.wait()
    exp_id = tracking.setup("tuneline")

    def running(owner: str) -> str:
        return store.create_run(exp_id, tags={tracking.OWNER_TAG: owner}).info.run_id

    orphan, live = running(dead_owner), running(tracking._owner())
    elsewhere = running(f"not-{socket.gethostname()}:{dead.pid}:0")
    reused_pid = running(dead_owner.rsplit(":", 1)[0] + ":1")  # the pid again, another process
    untagged = store.create_run(exp_id).info.run_id  # not ours to judge

    parent = tracking.start_parent(Params(), "prefect")
    status = {r.info.run_id: r.info.status for r in _runs(store)}
    assert status[orphan] == status[reused_pid] == "KILLED"
    assert status[live] == status[elsewhere] == status[untagged] == status[parent] == "RUNNING"


def test_secrets_in_uris_are_redacted():
    assert secrets.redact("postgresql://me:s3cret@db:5432/x") == "postgresql://me:***@db:5432/x"
    assert "s3cret" not in secrets.redact("see https://u:s3cret@host/path")


def test_secret_env_values_and_hub_tokens_are_redacted_everywhere_we_write(monkeypatch, tmp_path, capsys):
    import tuneline
    from tuneline.errors import print_error, report

    monkeypatch.setenv("HF_TOKEN", "hf_" + "A" * 34)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "tracking-pw-123")
    text = f"token {'hf_' + 'A' * 34}, another hf_{'b' * 30}, pw tracking-pw-123, uri mysql://root:pw@db/x"
    clean = secrets.redact(text)
    assert "A" * 34 not in clean and "b" * 30 not in clean and "tracking-pw-123" not in clean and ":pw@" not in clean
    assert clean.count("***") == 4

    print_error(f"cannot reach postgresql://me:s3cret@db/x with {'hf_' + 'A' * 34}")  # the terminal
    monkeypatch.setattr(tuneline, "ROOT", tmp_path)
    line = report(RuntimeError("failed with tracking-pw-123"), "train")  # the saved traceback
    saved = next((tmp_path / ".cache" / "errors").glob("*-train.log")).read_text()
    shown = capsys.readouterr().err + line + saved
    assert "s3cret" not in shown and "A" * 34 not in shown and "tracking-pw-123" not in shown


def test_a_pipeline_run_tags_its_overrides_without_secrets(store, monkeypatch):
    """What the flow records of its `--set` values (tag tuneline.overrides) holds no secret."""
    from flows.pipeline import tag_request

    monkeypatch.setenv("HF_TOKEN", "hf_" + "Z" * 34)
    parent = tracking.start_parent(Params(), "test")
    tag_request(
        store, parent, None, ["prepare.source=https://u:pw0rd@host/x.csv", "model.name=org/m", "x=" + "hf_" + "Z" * 34]
    )
    tags = store.get_run(parent).data.tags
    assert tags["tuneline.overrides"] == "prepare.source=https://u:***@host/x.csv model.name=org/m x=hf_***"
