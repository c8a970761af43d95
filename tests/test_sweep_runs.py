"""The sweep's MLflow side (tuneline/sweep_runs.py), on a throwaway SQLite store."""

from __future__ import annotations

from mlflow import MlflowClient

from tuneline import sweep_runs


def test_an_arm_stopped_between_its_stages_leaves_no_finished_run_beside_the_one_that_finishes(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what sweep_runs' client finds
    client = MlflowClient(uri)
    exp = client.create_experiment("sweep", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"tuneline.kind": "sweep"}).info.run_id

    def arm(name: str, status: str, under: str = parent) -> str:
        run = client.create_run(exp, tags={"mlflow.parentRunId": under, "dvc.experiment": name}).info.run_id
        if status != "RUNNING":
            client.set_terminated(run, status)
        return run

    # sweep-x-2: its train stage ended (run FINISHED), Ctrl-C before validate; a dead worker's RUNNING one
    between, orphan, failed = arm("sweep-x-2", "FINISHED"), arm("sweep-x-2", "RUNNING"), arm("sweep-x-2", "FAILED")
    done = arm("sweep-x-1", "FINISHED")  # an arm that finished: not one of those run again
    other = arm("sweep-x-2", "FINISHED", under=client.create_run(exp).info.run_id)  # another sweep's
    sweep_runs.abandon(parent, ["sweep-x-2"])
    status = {r: client.get_run(r).info.status for r in (between, orphan, failed, done, other)}
    assert status == {between: "KILLED", orphan: "KILLED", failed: "FAILED", done: "FINISHED", other: "FINISHED"}
