"""Progress display: throttled plain lines in logs, a rich bar on a terminal, silence under CI."""

import io
import re

import pytest
from rich.console import Console

from tuneline import progress
from tuneline.errors import TunelineError


class Clock:
    """A fake clock: each item of `_loop` takes `step` seconds."""

    def __init__(self, step: float):
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        return self.t


def _loop(clock: Clock, n: int, after: float = 0.0, **kw) -> None:
    with progress.bar("train", n, "steps", clock=clock, **kw) as b:
        for _ in range(n):
            clock.t += clock.step
            b.advance(1, tokens=500)
        clock.t += after  # work after the loop (saving a model) is not the loop's time


@pytest.fixture(autouse=True)
def _no_forced_mode(monkeypatch):
    monkeypatch.delenv("TUNELINE_PROGRESS", raising=False)
    monkeypatch.delenv("CI", raising=False)


def test_plain_lines_carry_percent_rate_and_eta_every_tenth_not_every_item(capsys):
    _loop(Clock(0.1), 1000, after=60)  # 100 s in all: a line per 10%, never the 30 s rule
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10  # 10%, 20%, ..., 90%, then the closing 100% line
    assert lines[4] == "[train] 500/1000 steps (50%) 5000 tok/s, ETA 50s"
    assert all(re.fullmatch(r"\[train\] \d+/1000 steps \(\d+%\) 5000 tok/s, ETA (\d+m)?\d+s", x) for x in lines[:-1])
    assert lines[-1] == "[train] 1000/1000 steps (100%) 5000 tok/s, took 1m40s"


def test_plain_lines_every_30_seconds_when_a_tenth_takes_longer(capsys):
    _loop(Clock(7.0), 100)  # 700 s, 70 s per 10%: the 30 s rule adds a line in between
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 20 and lines[0] == "[train] 5/100 steps (5%) 71 tok/s, ETA 11m05s"


def test_the_rate_keeps_one_unit_for_the_whole_loop(capsys):
    # A loop that counts tokens stays in tok/s through items of 0 tokens (it once flipped to
    # "prompts/s" and back); a loop that counts none gives items/s.
    clock = Clock(1.0)
    with progress.bar("evaluate", 100, "prompts", clock=clock) as b:
        for i in range(100):
            clock.t += clock.step
            b.advance(1, tokens=0 if i < 50 else 4)
    with progress.bar("evaluate", 100, "prompts", clock=clock) as b:
        for _ in range(100):
            clock.t += clock.step
            b.advance(1)
    first, second = capsys.readouterr().out.split("took")[:2]
    assert first.count("tok/s") == 10 and "prompts/s" not in first
    assert "[evaluate] 10/100 prompts (10%) 0.0 tok/s" in first
    assert second.count("prompts/s") == 10 and "tok/s" not in second


def test_a_loop_under_two_seconds_prints_nothing(capsys):
    _loop(Clock(0.0001), 1000)
    assert capsys.readouterr().out == ""


def test_resumed_loop_counts_only_its_own_items(capsys):
    clock = Clock(1.0)
    with progress.bar("train", 100, "steps", start=50, clock=clock) as b:
        for _ in range(10):
            clock.t += 1.0
            b.advance(1)
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "[train] 60/100 steps (60%) 1.0 steps/s, ETA 40s"  # items/s without tokens


@pytest.mark.parametrize("ci", ["1", "true"])
def test_ci_prints_nothing_on_a_log_or_a_terminal(capsys, monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    _loop(Clock(1.0), 50)
    term = io.StringIO()
    _loop(Clock(1.0), 50, console=Console(force_terminal=True, file=term))
    assert capsys.readouterr().out == "" and term.getvalue() == ""


def test_the_environment_forces_a_mode(capsys, monkeypatch):
    monkeypatch.setenv("CI", "1")
    monkeypatch.setenv("TUNELINE_PROGRESS", "plain")
    _loop(Clock(1.0), 50)
    assert "[train] 50/50 steps (100%)" in capsys.readouterr().out
    monkeypatch.setenv("TUNELINE_PROGRESS", "off")
    monkeypatch.delenv("CI")
    _loop(Clock(1.0), 50)
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("TUNELINE_PROGRESS", "fancy")
    with pytest.raises(TunelineError, match="bar, plain or off"):
        _loop(Clock(1.0), 5)


def test_a_terminal_gets_a_live_rich_bar_with_rate_and_eta(capsys):
    out = io.StringIO()
    clock = Clock(2.0)
    with progress.bar(
        "tokenize", 10, "examples", what="train", console=Console(force_terminal=True, file=out, width=120), clock=clock
    ) as b:
        for _ in range(5):
            clock.t += 2.0
            b.advance(1, tokens=300)
        mid = out.getvalue()
        for _ in range(5):
            clock.t += 2.0
            b.advance(1, tokens=300)
    assert capsys.readouterr().out == ""  # the bar, not plain lines
    mid_text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", mid)
    assert "━" in mid_text and "[tokenize] train:" in mid_text
    assert "5/10 examples (50%) 150 tok/s, ETA 10s" in mid_text
    assert "10/10 examples (100%) 150 tok/s, took 20s" in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())


def test_an_error_ends_the_bar_and_propagates():
    out = io.StringIO()
    with pytest.raises(ValueError):
        with progress.bar("train", 10, "steps", console=Console(force_terminal=True, file=out)) as b:
            b.advance(1)
            raise ValueError("boom")
    assert out.getvalue().endswith("\x1b[?25h")  # the cursor is shown again
