"""End to end on tiny data, in a throwaway project: Prefect flow, DVC, MLflow, registry."""

import ast
import json
import re
import sys
import time

import pytest
import yaml

pytestmark = pytest.mark.slow

STAGES = ["prepare", "tokenize", "train", "evaluate", "register"]


def _runs(proj, experiment="tuneline"):
    code = f"""
import json, mlflow
mlflow.set_tracking_uri('sqlite:///mlflow.db')
exp = mlflow.get_experiment_by_name('{experiment}')
runs = mlflow.search_runs([exp.experiment_id], output_format='list')
print(json.dumps([dict(id=r.info.run_id, status=r.info.status, tags=r.data.tags,
                       params=r.data.params, metrics=r.data.metrics) for r in runs]))
"""
    return json.loads(proj.python(code).strip().splitlines()[-1])


def test_flow_then_dvc_then_a_train_change(project):
    # 1. The Prefect flow runs every stage and registers a champion.
    out = project.run(sys.executable, "-m", "tuneline.cli", "run").stdout
    assert "pipeline finished" in out and "tuneline predict" in out
    runs = _runs(project)
    parents = [r for r in runs if r["tags"].get("tuneline.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0]["status"] == "FINISHED"
    children = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parents[0]["id"]]
    assert sorted(r["tags"]["tuneline.stage"] for r in children) == sorted(STAGES)
    assert all(r["params"]["train.lr"] == "0.002" for r in children + parents)  # flattened params everywhere
    assert {"base_exact_match", "tuned_bleu", "tuned_perplexity"} <= set(parents[0]["metrics"])
    train_run = next(r for r in children if r["tags"]["tuneline.stage"] == "train")
    assert {"train_loss", "val_loss", "tokens_per_s", "trainable_tokens_per_s", "mfu",
            "peak_memory_mb"} <= set(train_run["metrics"])  # logged per logging step

    # Artifacts a user looks for: the loss curve PNG and the predictions table.
    arts = project.python(
        "import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db'); c = mlflow.MlflowClient()\n"
        f"print([a.path for r in {[r['id'] for r in children]!r} for a in c.list_artifacts(r)])")
    assert "loss_curve.png" in arts and "predictions.json" in arts

    # The registered champion answers through the generic pyfunc interface, offline.
    answer = project.python(
        "import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db')\n"
        "m = mlflow.pyfunc.load_model('models:/descrambler@champion')\n"
        "print(repr(m.predict(['sat cat the'])))\n"
        "c = mlflow.MlflowClient(); v = c.get_model_version_by_alias('descrambler', 'champion')\n"
        "import json; print(json.dumps([v.version, sorted(v.aliases), v.tags['git.commit'], v.tags['data.prepare.md5']]))")
    pred, meta = answer.strip().splitlines()[-2:]
    assert isinstance(ast.literal_eval(pred)[0], str)
    version, aliases, commit, data_md5 = json.loads(meta)
    assert str(version) == "1" and aliases == ["challenger", "champion"] and commit
    assert re.fullmatch(r"[0-9a-f]{32}(\.dir)?", data_md5)
    # safetensors weights, no pickles
    files = project.run("find", "mlartifacts", "-name", "*.safetensors").stdout
    assert "model.safetensors" in files

    # 2. Right after, `dvc repro` skips every stage, fast, and nothing is out of date.
    t = time.time()
    out = project.run(sys.executable, "-m", "dvc", "repro").stdout
    assert time.time() - t < 10, "a no-op dvc repro must take at most 10 s"
    assert all(f"'{s}' didn't change" in out for s in STAGES), out
    assert "up to date" in project.run(sys.executable, "-m", "dvc", "status").stdout

    # 3. A train.* change re-runs only train, evaluate and register.
    project.set_params({"train": {"lr": 0.001}})
    status = json.loads(project.run(sys.executable, "-m", "dvc", "status", "--json").stdout)
    assert set(status) == {"train"}  # what DVC sees as changed
    out = project.run(sys.executable, "-m", "dvc", "repro").stdout
    for s in ("prepare", "tokenize"):
        assert f"'{s}' didn't change" in out
    for s in ("train", "evaluate", "register"):
        assert f"Running stage '{s}'" in out
    lock = yaml.safe_load((project.root / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train.lr"] == 0.001
    # DVC-started runs also get one parent with a child per stage that ran
    runs = _runs(project)
    dvc_parent = [r for r in runs if r["tags"].get("tuneline.source") == "dvc"]
    assert len(dvc_parent) == 1
    kids = [r["tags"]["tuneline.stage"] for r in runs if r["tags"].get("mlflow.parentRunId") == dvc_parent[0]["id"]]
    assert sorted(kids) == ["evaluate", "register", "train"]
