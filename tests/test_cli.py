import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "tuneline.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_doctor_finds_every_offline_asset():
    proc = _cli("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for label in ("GPT-2 tokenizer", "SmolLM2-135M-Instruct", "Wikipedia dump sample", "params.yaml"):
        assert f"ok   {label}" in proc.stdout


def test_bad_params_give_one_line_and_exit_2(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  lrr: 0.1\n")
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    proc = _cli("run", cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: params.yaml: unknown key 'train.lrr'. Fix: did you mean 'train.lr'?"]
    assert not (tmp_path / "mlflow.db").exists()  # nothing started


def test_help_lists_the_commands():
    out = _cli("--help").stdout
    for cmd in ("run", "ui", "predict", "doctor"):
        assert cmd in out


def test_an_unknown_recipe_is_one_line_with_a_suggestion(tmp_path):
    import shutil

    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    proc = _cli("run", "--recipe", "emotoin", "--smoke", cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: unknown recipe 'emotoin' (no recipes/emotoin.yaml). Fix: did you mean 'emotion'?"]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".smoke").exists()


def test_recipes_are_listed_with_what_they_do():
    out = _cli("recipes").stdout
    for name in ("descramble", "pretrain", "alpaca", "emotion", "mnli"):
        assert name in out
    assert "6-class emotion classification" in out


def _workdir(tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / f, tmp_path / f)
    return tmp_path


def test_evaluate_any_model_on_a_new_file_prints_saves_and_logs(tmp_path, model_cache):
    import json
    import os

    work = _workdir(tmp_path)
    data = work / "sentences.csv"
    data.write_text(
        "sentence\nThe old mill stood by the river for a century.\nShe painted the door a bright green.\n"
        "Rain fell on the quiet town all night long.\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TUNELINE_CACHE": str(model_cache)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tuneline.cli",
            "evaluate",
            "--model",
            "tiny-gpt2",
            "--recipe",
            "descramble",
            "--data",
            str(data),
            "--set",
            "prepare.columns.target=sentence",
            "--set",
            "evaluate.max_new_tokens=8",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "chrf" in proc.stdout and "(primary)" in proc.stdout and "on 3 examples" in proc.stdout
    saved = json.loads((work / "reports" / "evaluate" / "tiny-gpt2-sentences.json").read_text())
    assert saved["n_examples"] == 3 and set(saved["metrics"]) >= {"chrf", "exact_match", "perplexity"}
    runs = subprocess.run(
        [
            sys.executable,
            "-c",
            "import mlflow, json; mlflow.set_tracking_uri('sqlite:///mlflow.db');"
            "r = mlflow.search_runs(experiment_names=['tuneline'], output_format='list')[0];"
            "print(json.dumps([r.data.tags['tuneline.kind'], r.data.metrics['chrf']]))",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
    )
    kind, chrf = json.loads(runs.stdout.strip().splitlines()[-1])
    assert kind == "evaluation" and chrf == saved["metrics"]["chrf"]


def test_a_missing_data_file_or_version_is_one_line(tmp_path):
    work = _workdir(tmp_path)
    proc = _cli("evaluate", "--model", "tiny-gpt2", "--data", "nope.csv", cwd=work)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "nope.csv" in lines[0] and "Fix:" in lines[0]
    proc = _cli("promote", "4", "--reason", "try", cwd=work)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "INFO" not in line]
    assert proc.returncode == 2 and lines == [
        "error: model 'descrambler' has no version 4. Fix: choose one of: (none registered)"
    ]


def test_an_unforeseen_error_is_one_line_and_its_traceback_is_saved(tmp_path, monkeypatch, capsys):
    import pytest

    import tuneline
    from tuneline import cli, registry

    def broken(client, name):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(registry, "history", broken)
    monkeypatch.setattr(tuneline, "ROOT", tmp_path)  # where .cache/errors/ goes
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setattr(sys, "argv", ["tuneline", "history", "--name", "m"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err  # (MLflow may log that it created the store first)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "error: tuneline: unexpected ZeroDivisionError: division by zero" in lines[0]
    assert "Traceback" not in err
    saved = list((tmp_path / ".cache" / "errors").glob("*-tuneline.log"))
    assert len(saved) == 1 and saved[0].name in lines[0] and "Traceback" in saved[0].read_text()
    # --debug shows the traceback instead
    monkeypatch.setattr(sys, "argv", ["tuneline", "--debug", "history", "--name", "m"])
    with pytest.raises(ZeroDivisionError):
        cli.main()
