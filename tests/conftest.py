"""Shared fixtures: a tiny GPT-2 with the real GPT-2 tokenizer, and throwaway projects."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tiny, fast params for a whole-pipeline run (tiny-gpt2, a few hundred examples).
TINY = {
    "model": {"name": "tiny-gpt2"},
    "prepare": {"n_train": 160, "n_val": 16, "n_test": 16},
    "tokenize": {"max_length": 256},
    "train": {"max_steps": 6, "eval_every": 3, "log_every": 2, "batch_size": 4},
    "evaluate": {"n_examples": 8, "batch_size": 8},
}


from tuneline.recipes import merge  # noqa: E402  (the same deep merge recipes and --set use)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One `.cache` for every test project, so built-in models are built once."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["TUNELINE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def gpt2_tok():
    from tuneline.assets import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def tiny_gpt2(model_cache):
    from tuneline.modeling import load_model

    return load_model("tiny-gpt2")


def project_env(root: Path, cache: Path) -> dict[str, str]:
    """Environment for a subprocess run in `root`: its own MLflow store, Prefect home and
    DVC site cache (tuneline defaults them inside the project), the shared model cache."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PREFECT_HOME", "DVC_SITE_CACHE_DIR", "TUNELINE_ROOT",
                        "PREFECT_API_URL", "TUNELINE_PARENT_RUN_ID")}
    env["TUNELINE_CACHE"] = str(cache)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(root)
    return env


class Project:
    """A fresh copy of the pipeline (code, dvc.yaml, params) in a git + DVC repo."""

    def __init__(self, root: Path, cache: Path):
        self.root, self.env = root, project_env(root, cache)

    def run(self, *cmd: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def set_params(self, over: dict) -> None:
        path = self.root / "params.yaml"
        path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), over), sort_keys=False))

    def python(self, code: str) -> str:
        return self.run(sys.executable, "-c", code).stdout


def make_project(root: Path, cache: Path, params: dict | None = None) -> Project:
    for item in ("tuneline", "components", "flows", "recipes", "dvc.yaml", "params.yaml"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / item)
    proj = Project(root, cache)
    proj.run("git", "init", "-q")
    proj.run(sys.executable, "-m", "dvc", "init", "-q")
    proj.set_params(merge(TINY, params or {}))
    return proj


@pytest.fixture
def project(tmp_path, model_cache) -> Project:
    return make_project(tmp_path / "proj", model_cache)
