"""Nothing is lost on a crash: SIGKILL mid-training, re-run, same result as no crash."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import make_project

pytestmark = pytest.mark.slow

TRAIN = {"train": {"epochs": 2, "max_steps": 12, "eval_every": 3, "log_every": 1, "precision": "fp32"}}


def _train(proj, kill_after: str | None = None) -> None:
    cmd = [sys.executable, "-m", "tuneline.stages", "train"]
    if kill_after is None:
        proj.run(*cmd)
        return
    p = subprocess.Popen(cmd, cwd=proj.root, env=proj.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    for line in p.stdout:
        if kill_after in line or time.time() > deadline:
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL


def test_resume_after_kill_equals_an_uninterrupted_run(tmp_path, model_cache):
    results = []
    for name, kill in (("straight", None), ("killed", "[train] step 7/")):
        proj = make_project(tmp_path / name, model_cache, TRAIN)
        if kill:  # the same token data as the straight run (made by the same stages, same params)
            shutil.copytree(tmp_path / "straight" / "data", proj.root / "data")
        else:
            for stage in ("prepare", "tokenize"):
                proj.run(sys.executable, "-m", "tuneline.stages", stage)
        if kill:
            _train(proj, kill)
            assert list(proj.root.glob("checkpoints/train/step-*/state.pt"))
            assert not (proj.root / "models").exists()  # no half-written output
        out = proj.run(sys.executable, "-m", "tuneline.stages", "train").stdout
        if kill:
            # killed right after step 7: the last checkpoint is step 6 (or 9 if the kill was slow)
            assert re.search(r"resuming from checkpoint at step (6|9)/12", out), out
        results.append(json.loads((proj.root / "metrics/train.json").read_text()))
        curve = (proj.root / "plots/train.csv").read_text()
        results[-1]["curve"] = [line.split(",")[:3] for line in curve.splitlines()]
    straight, killed = results
    assert killed["steps"] == straight["steps"] == 12
    assert killed["final_train_loss"] == straight["final_train_loss"]
    assert killed["best_val_loss"] == straight["best_val_loss"]
    assert killed["curve"] == straight["curve"]
