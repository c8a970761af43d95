"""One training run per machine: a second run waits for the first, and a killed holder
never leaves the lock stuck."""

import subprocess
import sys
import time

from tuneline.lock import lock_path, machine_lock

HOLD = """
import sys, time
from tuneline.lock import machine_lock
from pathlib import Path
with machine_lock("train") as path:
    print("holding", flush=True)
    time.sleep(float(sys.argv[1]))
    (path.parent / "released").write_text("")  # the last thing before the lock goes
"""


def _holder(seconds: float, env) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(seconds)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_training_run_waits_for_the_first_and_says_why(tmp_path, monkeypatch, capsys):
    import os

    monkeypatch.setenv("TUNELINE_LOCK_DIR", str(tmp_path))
    holder = _holder(2, os.environ.copy())
    with machine_lock("train") as path:
        assert (tmp_path / "released").exists()  # we only got the lock once the first run was done
    holder.wait()
    assert path == lock_path("train") and path.parent == tmp_path
    out = capsys.readouterr().out
    assert "another train run is in progress (pid" in out and "waiting for it to finish" in out


def test_a_killed_holder_releases_the_lock(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("TUNELINE_LOCK_DIR", str(tmp_path))
    holder = _holder(600, os.environ.copy())
    holder.kill()  # SIGKILL: no cleanup code runs
    holder.wait()
    t = time.time()
    with machine_lock("train"):
        pass
    assert time.time() - t < 5  # not waiting on a dead process
    with machine_lock("train"):  # and it is released again after use
        pass


def test_the_train_stage_takes_the_lock(monkeypatch, tmp_path):
    """run_stage('train') holds the lock while the component runs; other stages do not."""
    import fcntl
    import os

    from tuneline import stages

    monkeypatch.setenv("TUNELINE_LOCK_DIR", str(tmp_path))
    seen = {}

    def fake_run(name):
        fd = os.open(lock_path("train"), os.O_RDONLY | os.O_CREAT)
        try:  # a second descriptor cannot take a lock that this process's stage holds
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen[name] = False
        except BlockingIOError:
            seen[name] = True
        finally:
            os.close(fd)
        return {}

    import contextlib

    import components.evaluate
    import components.train
    from tuneline import tracking
    from tuneline.config import Params

    # the stages' own work is replaced by a probe of the lock; no MLflow run is opened
    monkeypatch.setattr(tracking, "stage_run", lambda name, params: contextlib.nullcontext())
    monkeypatch.setattr(components.train, "run", lambda params: fake_run("train"))
    monkeypatch.setattr(components.evaluate, "run", lambda params: fake_run("evaluate"))

    stages.run_stage("train", Params())
    stages.run_stage("evaluate", Params())
    assert seen == {"train": True, "evaluate": False}
