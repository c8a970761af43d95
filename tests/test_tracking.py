import mlflow
import pytest

from tuneline import tracking
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


def test_the_flow_parent_is_reused_by_every_stage(store, monkeypatch):
    parent = tracking.start_parent(Params(), "prefect")
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    for stage in ("prepare", "tokenize"):
        with tracking.stage_run(stage, Params()):
            pass
    kids = [r for r in _runs(store) if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.data.tags["tuneline.stage"] for r in kids) == ["prepare", "tokenize"]


def test_secrets_in_uris_are_redacted():
    assert tracking.redact("postgresql://me:s3cret@db:5432/x") == "postgresql://me:***@db:5432/x"
    assert "s3cret" not in tracking.redact("see https://u:s3cret@host/path")
