"""A sweep's arms on DVC's queue (flows/sweep_arms.py): watched until each ends, reported
as they end and while they run, and stopped with the sweep. DVC's queue is faked here; the
whole sweep on the tiny model is tests/test_sweep.py."""

import types

import pytest

from flows import sweep_arms
from tuneline import sweep_queue, sweep_runs


def _raise(stop):
    raise stop


@pytest.mark.parametrize("during", ["poll", "start"])
@pytest.mark.parametrize("stop", [KeyboardInterrupt, "TerminationSignal"])
def test_a_stopped_sweep_stops_its_running_arm_and_empties_the_queue(stop, during, monkeypatch):
    """Ctrl-C, or SIGTERM (`kill PID`, a cancelled deployment run), which Prefect raises inside a
    flow as its TerminationSignal. The arms run under DVC's queue worker, in a session of their
    own: a sweep stopped by SIGTERM used to say its arm was stopped and leave it training, and
    so did one stopped while `dvc queue start` ran (during="start")."""
    from prefect.exceptions import TerminationSignal

    stop = TerminationSignal(signal=15) if stop == "TerminationSignal" else stop()
    polls = iter([{}, stop])  # `experiments` before the loop, then the signal in its first poll

    def experiments(root):
        got = next(polls)
        if isinstance(got, BaseException):
            raise got
        return got

    asked = []
    monkeypatch.setattr(sweep_queue, "experiments", experiments)
    monkeypatch.setattr(sweep_queue, "start", (lambda *a: _raise(stop)) if during == "start" else (lambda *a: None))
    monkeypatch.setattr(
        sweep_queue,
        "queue_status",
        lambda root, dvc: {"s-1": "Running", "s-2": "Queued", sweep_queue.WORKERS: "1"},
    )
    monkeypatch.setattr(sweep_queue, "run_dvc", lambda args, root, dvc, check: asked.append(args))
    monkeypatch.setattr(sweep_runs, "abandon", lambda parent, names: asked.append(["abandon", *names]))
    with pytest.raises(type(stop)):
        sweep_arms.run_arms.fn(["s-1", "s-2"], [{}, {}], 1, "chrf", "parent-run")
    assert asked == [["queue", "remove", "s-2"], ["queue", "kill", "s-1"], ["queue", "stop"], ["abandon", "s-1"]]


def test_a_sweep_stopped_while_queueing_its_arms_takes_the_queued_ones_off_the_queue(monkeypatch, tmp_path):
    """`dvc exp run --queue` takes seconds an arm. Stopped after the first was queued, the
    sweep left it queued with no worker, where the next sweep's worker would run it."""
    queued, asked = [], []
    monkeypatch.setattr(sweep_arms, "ROOT", tmp_path)
    monkeypatch.setattr(sweep_queue, "experiments", lambda root: {})
    monkeypatch.setattr(
        sweep_queue, "queue_status", lambda root, dvc: {n: "Queued" for n in queued} | {sweep_queue.WORKERS: "0"}
    )

    def queue(arms, names, *rest):
        for name in names:
            if queued:  # the second arm: Ctrl-C
                raise KeyboardInterrupt
            queued.append(name)

    monkeypatch.setattr(sweep_queue, "queue", queue)
    monkeypatch.setattr(sweep_queue, "run_dvc", lambda args, root, dvc, check: asked.append(args))
    monkeypatch.setattr(sweep_runs, "abandon", lambda parent, names: asked.append(["abandon", *names]))
    with pytest.raises(KeyboardInterrupt):
        sweep_arms.queue_arms([{"train.lr": 1}, {"train.lr": 2}], ["s-1", "s-2"], "parent-run")
    assert queued == ["s-1"]
    assert asked == [["abandon", "s-1", "s-2"], ["queue", "remove", "s-1"], ["queue", "stop"], ["abandon"]]


def test_an_arm_that_ends_between_two_reads_of_the_queue_is_reported_once_its_result_is_there(monkeypatch, capsys):
    """The queue may say an arm succeeded before git holds its result (it ended between the
    two reads): it is reported, with its score, on the next round, not a crash."""
    refs = iter([{}, {}, {"s-1": "abc123"}])  # before the sweep, round 1, round 2
    monkeypatch.setattr(sweep_queue, "experiments", lambda root: next(refs))
    monkeypatch.setattr(sweep_queue, "queue_status", lambda root, dvc: {"s-1": "Success", sweep_queue.WORKERS: "1"})
    monkeypatch.setattr(sweep_queue, "start", lambda *a: None)
    monkeypatch.setattr(sweep_queue, "read_at", lambda sha, path, root: '{"chrf": 70.5}' if sha == "abc123" else None)
    monkeypatch.setattr(sweep_arms, "time", types.SimpleNamespace(time=sweep_arms.time.time, sleep=lambda s: None))
    assert sweep_arms.run_arms.fn(["s-1"], [{}], 1, "chrf", "parent") == {"s-1": "Success"}
    assert "[sweep] s-1: success, validation chrf 70.5 (1/1 arms finished)" in capsys.readouterr().out


def test_a_running_arm_shows_its_progress_about_once_a_minute(monkeypatch, capsys):
    """A long arm is not silent: its newest progress line is shown every PROGRESS_EVERY_S,
    and only when it changed."""
    clock = [0.0]
    monkeypatch.setattr(
        sweep_arms,
        "time",
        types.SimpleNamespace(time=lambda: clock[0], sleep=lambda s: clock.__setitem__(0, clock[0] + s)),
    )
    monkeypatch.setattr(sweep_queue, "experiments", lambda root: {"s-1": "abc123"} if clock[0] >= 200 else {})
    state = lambda: "Success" if clock[0] >= 200 else "Running"  # noqa: E731
    monkeypatch.setattr(sweep_queue, "queue_status", lambda root, dvc: {"s-1": state(), sweep_queue.WORKERS: "1"})
    monkeypatch.setattr(sweep_queue, "start", lambda *a: None)
    monkeypatch.setattr(sweep_queue, "read_at", lambda sha, path, root: '{"chrf": 70.5}')
    lines = {60: "[train] 10/40 steps (25%)", 120: "[train] 10/40 steps (25%)", 180: "[train] 30/40 steps (75%)"}
    monkeypatch.setattr(sweep_queue, "last_progress", lambda name, root: lines.get(int(clock[0])))
    assert sweep_arms.run_arms.fn(["s-1"], [{}], 1, "chrf", "parent") == {"s-1": "Success"}
    out = capsys.readouterr().out.splitlines()
    shown = [line for line in out if "steps" in line]
    assert shown == ["[sweep] s-1: [train] 10/40 steps (25%)", "[sweep] s-1: [train] 30/40 steps (75%)"], out
