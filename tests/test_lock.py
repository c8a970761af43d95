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


def test_with_n_training_slots_each_holder_gets_its_own_device(tmp_path, monkeypatch, capsys):
    """A sweep's --jobs N: arms train side by side, one per GPU; slot 0 is the machine-wide
    lock, so a plain run elsewhere still waits for (or holds) device 0."""
    import threading

    from tuneline.lock import train_slot

    monkeypatch.setenv("TUNELINE_LOCK_DIR", str(tmp_path))
    with train_slot(2) as a, train_slot(2) as b:
        assert (a, b) == (0, 1)
        got = []
        waiter = threading.Thread(target=lambda: got.append(_take(train_slot(3, poll=0.1))))
        waiter.start()
        waiter.join(5)
        assert got == [2]  # a third slot is free
        late = threading.Thread(target=lambda: got.append(_take(train_slot(2, poll=0.1))))
        late.start()
        time.sleep(0.5)
        assert got == [2] and late.is_alive()  # both slots held: it waits
    late.join(5)
    assert got == [2, 0] and "all 2 training slots are in use" in capsys.readouterr().out
    with train_slot(1) as none:
        assert none is None


def _take(cm):
    with cm as slot:
        return slot
