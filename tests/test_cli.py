import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "tuneline.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


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
