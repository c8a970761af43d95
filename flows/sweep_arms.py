"""A sweep's arms on DVC's queue (flows/sweep.py puts the sweep in order): queue the arms
not already run, start DVC's queue worker and watch it, saying when each arm ends and about
how long the rest will take, stop the arms on Ctrl-C or SIGTERM, and read back each arm's
validation results from its experiment. The DVC commands themselves are tuneline/sweep_queue.py.
"""

from __future__ import annotations

import json
import os
import sys
import time

from prefect import task
from prefect.exceptions import TerminationSignal

from tuneline import ROOT, sweep, sweep_queue, sweep_runs
from tuneline.data import VAL_EXAMPLES, metrics_file
from tuneline.errors import TunelineError
from tuneline.io import write_json
from tuneline.lock import SLOTS_ENV
from tuneline.store import ARMS, tracking_uri
from tuneline.tracking import PARENT_ENV, SWEEP_ENV

DVC = (sys.executable, "-m", "dvc")
TARGET = "validate"  # an arm runs the pipeline up to here: never evaluate, which reads test


def minutes(s: float) -> str:
    return f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def queue_arms(arms: list[sweep.Arm], names: list[str], parent: str) -> bool:
    """Queue the arms not already run or queued; whether any arm is left to run. Queueing
    takes seconds an arm: stopped meanwhile, the arms queued so far are taken off the queue
    (left there, any later worker would run them)."""
    try:
        queued = _queue_missing(arms, names, parent)
        status = sweep_queue.queue_status(ROOT, DVC)
    except STOPPED:
        stop(names, parent)
        raise
    return bool(queued) or any(status.get(n) in ("Queued", "Running") for n in names)


def _queue_missing(arms: list[sweep.Arm], names: list[str], parent: str) -> list[str]:
    """Queue the arms not already run or queued; returns their names."""
    done, status = sweep_queue.experiments(ROOT), sweep_queue.queue_status(ROOT, DVC)
    alive = status[sweep_queue.WORKERS] != "0"  # "Running" with no worker: its sweep's worker died with it
    (ROOT / ARMS).mkdir(parents=True, exist_ok=True)
    todo = []
    for arm, name in zip(arms, names):
        # what the arm's stages read: the sweep's run and store (store.arm_record)
        write_json(ROOT / ARMS / f"{name}.json", {"sweep_run_id": parent, "tracking_uri": tracking_uri()})
        if name in done or status.get(name) == "Queued" or (status.get(name) == "Running" and alive):
            continue
        todo.append((arm, name))
    if len(todo) < len(arms):
        print(f"[sweep] {len(arms) - len(todo)} of {len(arms)} arms already run or queued: not run again")
    _requeue(todo, status, parent)
    return [n for _, n in todo]


def _requeue(todo: list[tuple[sweep.Arm, str]], status: dict[str, str], parent: str) -> None:
    """Queue `todo`, first clearing what an earlier attempt left of them: an arm still listed
    as running is killed, a listed one taken off the queue, its MLflow run ended."""
    names = [n for _, n in todo]
    running = [n for n in names if status.get(n) == "Running"]
    if running:
        sweep_queue.run_dvc(["queue", "kill", *running], ROOT, DVC, check=False)
    listed = [n for n in names if status.get(n) in ("Running", "Failed")]
    if listed:
        sweep_queue.run_dvc(["queue", "remove", *listed], ROOT, DVC, check=False)
    sweep_runs.abandon(parent, names)
    _queue(todo)


def _queue(todo: list[tuple[sweep.Arm, str]]) -> None:
    # What the arms start from besides git's view: the shared stages' record and metrics.
    # (Untracked, e.g. in a new project, every arm would run prepare and tokenize again.)
    shared = ["dvc.lock", *(str(metrics_file(s)) for s in ("prepare", "tokenize"))]
    sweep_queue.queue(
        [a for a, _ in todo], [n for _, n in todo], TARGET, ROOT, DVC, sweep_queue.untracked(shared, ROOT)
    )


def _worker_env(jobs: int) -> dict[str, str]:
    """The queue worker runs `dvc` and `python` from this environment, in its own copy of
    the project: nothing may point it back at this one."""
    env = {k: v for k, v in os.environ.items() if k not in ("TUNELINE_ROOT", PARENT_ENV, SWEEP_ENV)}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # built-in models are materialised once per project, not once per arm's copy
    env.setdefault("TUNELINE_CACHE", str(ROOT / ".cache"))
    env[SLOTS_ENV] = str(jobs)  # with N workers, each arm trains on a GPU of its own (lock.train_slot)
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.realpath(p) != str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(kept)  # the copy's own code, found from its working directory
    if not kept:
        env.pop("PYTHONPATH")
    return env


# Ctrl-C, or SIGTERM (`kill PID`, a cancelled deployment run): inside a flow Prefect turns
# SIGTERM into its TerminationSignal, which is no KeyboardInterrupt. The arms run under DVC's
# queue worker, in a session of their own: a sweep stopped either way must stop them itself.
STOPPED = (KeyboardInterrupt, TerminationSignal)
STATUS_EVERY_S = 30  # how often the queue is asked while an arm runs (run_arms)
PROGRESS_EVERY_S = 60  # how often a running arm's newest progress line is shown


@task(name="run-arms", task_run_name="run the arms (DVC queue)")
def run_arms(
    names: list[str],
    arms: list[sweep.Arm],
    jobs: int,
    metric: str,
    parent: str,
    estimates: list[float] | None = None,
) -> dict[str, str]:
    """Start DVC's worker and wait for this sweep's arms, saying when each one ends and
    about how long the rest will take (`estimates`: each arm's seconds, from the plan)."""
    idle, restarts = 0.0, 0
    started: dict[str, float] = {}  # arm -> when it was first seen running
    took: dict[int, float] = {}  # arm index -> seconds, for the arms that ran in this sweep
    last_end = time.time()
    before = set(sweep_queue.experiments(ROOT))
    seen = {n: "Success" for n in names if n in before}  # run before (a sweep run again): not reported
    status: dict[str, str] = {}
    asked, done = 0.0, dict.fromkeys(before, "")
    shown, progress = time.time(), {}
    try:
        # inside: a signal while `dvc queue start` runs (seconds) left the worker training
        sweep_queue.start(jobs, ROOT, DVC, _worker_env(jobs))
        while True:
            # `dvc queue status` is a Python process that takes a core for a second or two:
            # asked every 5 s, it halved the training speed of the arm beside it on 2 cores.
            # Git's refs are cheap: the queue is asked when an arm has finished, while no arm
            # runs (one is about to start), and every STATUS_EVERY_S seconds otherwise.
            finished_now = sweep_queue.experiments(ROOT)
            waiting = not any(status.get(n) == "Running" for n in names)
            if finished_now.keys() != done.keys() or waiting or time.time() - asked >= STATUS_EVERY_S:
                status, asked = sweep_queue.queue_status(ROOT, DVC), time.time()
            done = finished_now
            idle = 0.0 if status[sweep_queue.WORKERS] != "0" else idle or time.time()
            if idle and time.time() - idle > 30:  # no worker, arms unfinished: it stopped (or never started)
                restarts += 1
                if restarts > 3:
                    raise TunelineError(
                        "DVC's queue worker keeps stopping before the sweep's arms finish",
                        "see `dvc queue status` and .dvc/tmp/exps/celery/; then run the same command again",
                    )
                # an arm "Running" with no worker died with it: off the queue, and queued again
                stale = [(a, n) for a, n in zip(arms, names) if status.get(n) == "Running"]
                if stale:
                    _requeue(stale, status, parent)
                sweep_queue.start(jobs, ROOT, DVC, _worker_env(jobs))
                idle, asked = 0.0, 0.0  # the queue asked again at once
            for n in names:
                now = "Success" if n in done else status.get(n, "Queued")
                if now == "Success" and n not in done:  # it ended after its ref was read: the next round has it
                    now = "Running"
                if now != seen.get(n) and now in ("Running", "Success", "Failed"):
                    finished = sum(1 for m in names if m in done or status.get(m) == "Failed")
                    left = ""
                    if now == "Running":
                        started[n] = time.time()
                    else:
                        if now == "Success":  # a failed arm's time says nothing about the others
                            took[names.index(n)] = time.time() - started.get(n, last_end)
                        last_end = time.time()
                        unfinished = [i for i, m in enumerate(names) if m not in done and status.get(m) != "Failed"]
                        secs = sweep.time_left(unfinished, took, estimates, jobs) if unfinished else None
                        left = f"; about {minutes(secs)} left" if secs is not None else ""
                    score = ""
                    if now == "Success":
                        got = sweep_queue.read_at(done[n], str(metrics_file("validate")), ROOT)
                        score = f", validation {metric} {json.loads(got)[metric]:.4g}" if got else ""
                    print(
                        f"[sweep] {n}: {now.lower()}{score} ({finished}/{len(names)} arms finished{left})", flush=True
                    )
                seen[n] = now
            if time.time() - shown >= PROGRESS_EVERY_S:  # long arms show progress (a file read, no DVC call)
                shown = time.time()
                for n in (n for n in names if seen.get(n) == "Running"):
                    line = sweep_queue.last_progress(n, ROOT)
                    if line and line != progress.get(n):
                        progress[n] = line
                        print(f"[sweep] {n}: {line}", flush=True)
            if all(seen.get(n) in ("Success", "Failed") for n in names):
                return seen
            time.sleep(5)
    except STOPPED:
        stop(names, parent)
        raise


def stop(names: list[str], parent: str) -> None:
    """What a stopped sweep does, whether it was queueing its arms or watching them: its
    arms off the queue first (a worker told to stop still takes the next task), then the
    running arm stopped (DVC sends it SIGINT). The same command queues them again."""
    status = sweep_queue.queue_status(ROOT, DVC)
    queued = [n for n in names if status.get(n) == "Queued"]
    if queued:
        sweep_queue.run_dvc(["queue", "remove", *queued], ROOT, DVC, check=False)
    running = [n for n in names if status.get(n) == "Running"]
    if running:
        sweep_queue.run_dvc(["queue", "kill", *running], ROOT, DVC, check=False)
    sweep_queue.run_dvc(["queue", "stop"], ROOT, DVC, check=False)
    sweep_runs.abandon(parent, running)  # stopped between two stages, its run says FINISHED


def results(names: list[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """{name: {"commit", "metrics", "examples"}} of the arms that finished, and
    {name: why} of those that did not."""
    done, ok, failed = sweep_queue.experiments(ROOT), {}, {}
    for n in names:
        if n not in done:
            failed[n] = sweep_queue.failure(sweep_queue.run_dvc(["queue", "logs", n], ROOT, DVC, check=False))
            continue
        metrics, examples = (
            sweep_queue.read_at(done[n], str(p), ROOT) for p in (metrics_file("validate"), VAL_EXAMPLES)
        )
        if metrics is None or examples is None:
            failed[n] = "the experiment has no validation metrics"
            continue
        ok[n] = {"commit": done[n], "metrics": json.loads(metrics), "examples": json.loads(examples)}
    return ok, failed
