"""`tuneline run --recipe R --smoke` for every recipe, and a real recipe run recorded in DVC and MLflow."""

import hashlib
import json
import sys

import pytest
import yaml
from conftest import SHARED_DATA, copy_project

pytestmark = pytest.mark.slow

# Tiny model: these check the pipeline end to end, not the model (see README for real runs).
SETS = {
    "descramble": [],
    "pretrain": [],
    "mnli": [],
    "alpaca": [f"prepare.source={SHARED_DATA / 'alpaca/alpaca_data.json'}"],
    "chat": [f"prepare.source=alpaca-chat:{SHARED_DATA / 'alpaca/alpaca_data.json'}"],
    "emotion": [
        f"prepare.source={SHARED_DATA / 'emotion/train.jsonl'}",
        f"prepare.test_source={SHARED_DATA / 'emotion/validation.jsonl'}",
    ],
}
PRIMARY = {
    "descramble": "chrf",
    "pretrain": "perplexity",
    "mnli": "accuracy",
    "alpaca": "rouge_l",
    "chat": "rouge_l",
    "emotion": "accuracy",
}


def _cli(project, *args):
    return project.run(sys.executable, "-m", "tuneline.cli", *args, timeout=600)


def _mlflow(project, code):
    return json.loads(
        project.python(
            "import json, mlflow\nmlflow.set_tracking_uri('sqlite:///mlflow.db')\nc = mlflow.MlflowClient()\n" + code
        )
        .strip()
        .splitlines()[-1]
    )


@pytest.fixture(scope="module")
def smoked(request, tmp_path_factory, model_cache, prefect_api) -> dict:
    """Each selected recipe's smoke run in a fresh project, two at a time (separate projects
    and processes; most of a run is a process importing its libraries): {recipe: (project,
    params.yaml before, output)}."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import make_project

    chosen = [
        item.callspec.params["recipe"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_smoke_runs_every_recipe_and_touches_nothing_real"
    ]
    chosen = [r for r in chosen if not (r in ("alpaca", "chat", "emotion") and not SHARED_DATA.is_dir())]

    def smoke(recipe: str):
        project = make_project(tmp_path_factory.mktemp(recipe) / "proj", model_cache)
        project.env["PREFECT_API_URL"] = prefect_api  # one Prefect server for all runs, as `tuneline ui` gives
        before = (project.root / "params.yaml").read_text()
        args = [a for s in ["model.name=tiny-gpt2", *SETS[recipe]] for a in ("--set", s)]
        proc = _cli(project, "run", "--recipe", recipe, "--smoke", *args)
        return project, before, proc.stdout, proc.stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {recipe: pool.submit(smoke, recipe) for recipe in chosen}
        return {recipe: f.result() for recipe, f in futures.items()}


@pytest.mark.parametrize("recipe", list(SETS))
def test_smoke_runs_every_recipe_and_touches_nothing_real(recipe, smoked):
    if recipe in ("alpaca", "chat", "emotion") and not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside the repository")
    project, before, out, err = smoked[recipe]
    assert "smoke run finished" in out
    # What a user reads is ours: no library's warning, no progress-bar redraws (the output is a pipe)
    noise = [line for line in (out + err).splitlines() if "Warning" in line or "%|" in line]
    assert noise == [], noise[:5]
    evals = json.loads((project.root / ".smoke" / recipe / "metrics/eval.json").read_text())
    assert PRIMARY[recipe] in evals["tuned"] and evals["n_examples"] >= 1
    # The real pipeline is untouched: params.yaml, dvc.lock, outputs, the registry.
    assert (project.root / "params.yaml").read_text() == before
    assert not (project.root / "dvc.lock").exists() and not (project.root / "data").exists()
    runs = _mlflow(
        project,
        "exp = c.get_experiment_by_name('smoke')\n"
        "rs = c.search_runs([exp.experiment_id], filter_string=\"tags.`tuneline.kind` = 'pipeline'\")\n"
        "print(json.dumps([[r.info.status, r.data.tags['tuneline.recipe'], len(c.search_registered_models())]"
        " for r in rs]))",
    )
    assert runs == [["FINISHED", recipe, 0]]


def test_a_recipe_run_is_a_dvc_experiment_and_an_mlflow_run_with_the_same_params(project, prefect_api):
    project.env["PREFECT_API_URL"] = prefect_api
    project.run("git", "add", "-A")
    project.run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    sets = [
        "model.name=tiny-gpt2",
        "prepare.n_val=16",
        "prepare.n_test=4",
        "train.max_steps=3",
        "train.eval_every=3",
        "tokenize.max_length=128",
    ]
    # typed in a subfolder of the project, as git and dvc allow: the run is the project's
    (project.root / "notes").mkdir()
    args = ["run", "--recipe", "pretrain", *[a for s in sets for a in ("--set", s)]]
    project.run(sys.executable, "-m", "tuneline.cli", *args, timeout=600, cwd=project.root / "notes")
    written = yaml.safe_load((project.root / "params.yaml").read_text())
    assert written["prepare"]["task"] == "pretrain" and written["train"]["max_steps"] == 3
    assert "Written by `tuneline run --recipe pretrain" in (project.root / "params.yaml").read_text()
    exps = project.dvc_json("exp", "show")
    recorded = [e for b in exps for e in (b.get("experiments") or [])]
    names = [r["name"] for r in recorded]
    assert any(n.startswith("pretrain-") for n in names), names
    exp_params = recorded[0]["revs"][0]["data"]["params"]["params.yaml"]["data"]
    assert exp_params["train"]["max_steps"] == 3 and exp_params["model"]["name"] == "tiny-gpt2"
    mlflow_params = _mlflow(
        project,
        "exp = c.get_experiment_by_name('tuneline')\n"
        "r = c.search_runs([exp.experiment_id], filter_string=\"tags.`tuneline.kind` = 'pipeline'\")[0]\n"
        "print(json.dumps([r.data.params, r.data.tags.get('dvc.experiment')]))",
    )
    assert mlflow_params[0]["train.max_steps"] == "3" and mlflow_params[0]["prepare.task"] == "pretrain"
    assert mlflow_params[1] in names
    # The recipe's metric: perplexity over all test tokens, lower is better for the gate.
    assert json.loads((project.root / "metrics/eval.json").read_text())["primary_metric"] == "perplexity"


def test_a_smoke_run_in_a_trained_project_scores_and_logs_its_own_model(built, tmp_path, prefect_api):
    """The smoke's stages run in .smoke/<recipe>/ and read its models/merged, not the
    project's: a user who had trained once got the project's model evaluated and logged as
    the smoke's, and its LoRA merge parity failed (logit difference 22.6)."""
    project = copy_project(built, tmp_path / "proj")
    project.env["PREFECT_API_URL"] = prefect_api
    main_model = (project.root / "models/merged/model.safetensors").read_bytes()
    proc = _cli(project, "run", "--smoke")
    assert "smoke run finished" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "8/8 greedy answers the same" in proc.stdout + proc.stderr  # its merge is its adapter's
    own = project.root / ".smoke/params/models/merged/model.safetensors"
    assert own.read_bytes() != main_model  # it trained a model of its own...
    logged = _mlflow(
        project,
        "exp = c.get_experiment_by_name('smoke')\n"
        "r = c.search_runs([exp.experiment_id], filter_string=\"tags.`tuneline.stage` = 'register'\")[0]\n"
        "import glob, hashlib\n"
        "p = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, artifact_path='model')\n"
        "f = glob.glob(p + '/**/model.safetensors', recursive=True)[0]\n"
        "print(json.dumps(hashlib.sha256(open(f, 'rb').read()).hexdigest()))",
    )
    assert logged == hashlib.sha256(own.read_bytes()).hexdigest()  # ...and logged that one
