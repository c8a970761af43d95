"""Progress of the stages' long loops, one wrapper for all of them.

    with progress.bar("train", total_steps, "steps") as b:
        for ...:
            b.advance(1, tokens=n)

Three modes (TUNELINE_PROGRESS=bar|plain|off forces one):
- bar: stdout is a terminal: a live rich bar with the tokens/s rate and an ETA;
- plain: stdout is a log (DVC, a pipe, a file): a line such as
  `[train] 40/80 steps (50%) 1234 tok/s, ETA 1m20s` each time another 10% is done or
  30 s went by, never one per item; a loop that takes under 2 s prints nothing;
- off: CI is set (CI logs keep the stage summaries only), or a non-main DDP rank.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

from tuneline.errors import TunelineError

MODES = ("bar", "plain", "off")
EVERY_PCT, EVERY_S, QUIET_S = 10, 30.0, 2.0  # plain mode: a line per 10% or per 30 s; silent under 2 s


def mode(console=None) -> str:
    forced = os.environ.get("TUNELINE_PROGRESS", "").strip().lower()
    if forced:
        if forced not in MODES:
            raise TunelineError(
                f"TUNELINE_PROGRESS={forced!r} is not one of {', '.join(MODES)}",
                "set it to bar, plain or off, or unset it",
            )
        return forced
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return "off"
    from rich.console import Console

    return "bar" if (console or Console()).is_terminal else "plain"


def duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


class Bar:
    """Counts items and tokens; `status` says where the loop stands. Shows nothing itself
    (the off mode); the subclasses below show it."""

    def __init__(self, label: str, what: str, total: int, unit: str, start: int, clock: Callable[[], float]):
        self.head = f"[{label}]" + (f" {what}:" if what else "")  # '[tokenize] train:'
        self.total, self.unit, self.clock = total, unit, clock
        self.start = self.done = start  # a resumed loop: rates and ETA count this run's items only
        self.tokens, self.t0, self.t_end = None, clock(), None  # None: no tokens counted, the rate is items/s

    def advance(self, n: int = 1, tokens: int | None = None) -> None:
        self.done += n
        if tokens is not None:  # once counted, the rate stays tok/s (a stretch of 0 tokens must not flip it)
            self.tokens = (self.tokens or 0) + tokens
        if self.done >= self.total and self.t_end is None:
            self.t_end = self.clock()  # the loop's own time: work after it (saving) is not in it
        self._show()

    def status(self) -> str:
        """'40/80 steps (50%) 1234 tok/s, ETA 1m20s' (no tokens counted: steps/s)."""
        elapsed, ran = self.elapsed(), self.done - self.start
        text = f"{self.done}/{self.total} {self.unit} ({self.pct():.0f}%)"
        if ran > 0 and elapsed > 0:
            rate = (ran if self.tokens is None else self.tokens) / elapsed
            text += f" {rate:.0f}" if rate >= 10 else f" {rate:.1f}"
            text += f" {self.unit}/s" if self.tokens is None else " tok/s"
        if self.done >= self.total:
            return f"{text}, took {duration(elapsed)}"
        return f"{text}, ETA {duration(elapsed / ran * (self.total - self.done))}" if ran > 0 else f"{text}, ETA ?"

    def elapsed(self) -> float:
        return (self.clock() if self.t_end is None else self.t_end) - self.t0

    def pct(self) -> float:
        return 100 * self.done / self.total if self.total else 100.0

    def _show(self) -> None:
        pass

    def stop(self) -> None:
        """End the display (on an error too)."""

    def close(self) -> None:
        """The loop ended normally."""
        self.stop()


class _Plain(Bar):
    def __init__(self, *args):
        super().__init__(*args)
        self.last, self.lines, self.mark = self.t0, 0, self._next_mark()

    def _next_mark(self) -> float:  # the next multiple of 10% (a resumed loop starts past some)
        return (self.pct() // EVERY_PCT + 1) * EVERY_PCT

    def _print(self) -> None:
        print(f"{self.head} {self.status()}", flush=True)
        self.last, self.lines, self.mark = self.clock(), self.lines + 1, self._next_mark()

    def _show(self) -> None:
        now = self.clock()
        if self.done < self.total and (
            now - self.last >= EVERY_S or (self.pct() >= self.mark and now - self.t0 >= QUIET_S)
        ):
            self._print()

    def close(self) -> None:  # the closing line, with the whole loop's rate and time
        if self.lines or self.elapsed() >= QUIET_S:
            self._print()


class _Rich(Bar):
    def __init__(self, *args, console=None):
        from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
        from rich.text import Text

        super().__init__(*args)
        bar = self

        class Status(ProgressColumn):  # the plain line's text: one wording in both modes
            def render(self, task) -> Text:
                return Text(bar.status())

        self.progress = Progress(
            TextColumn(self.head, markup=False),
            BarColumn(),
            Status(),
            console=console,
            get_time=self.clock,
            refresh_per_second=4,
        )
        self.task = self.progress.add_task(self.head, total=self.total, completed=self.start)
        self.progress.start()
        self.shown = self.t0

    def _show(self) -> None:
        self.progress.update(self.task, completed=self.done)
        if self.clock() - self.shown >= 0.25:  # now, not only on the 4 Hz timer; throttled (a render costs ~1 ms)
            self.progress.refresh()
            self.shown = self.clock()

    def stop(self) -> None:
        self.progress.update(self.task, completed=self.done)
        self.progress.stop()  # gives the terminal back (before an error is printed, too)


@contextlib.contextmanager
def bar(
    label: str,
    total: int,
    unit: str = "items",
    what: str = "",
    start: int = 0,
    show: bool = True,
    console=None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Bar]:
    """Progress of stage `label` over `total` items (`unit`, e.g. "steps"), optionally
    `what` part of it (e.g. the split); `start` items are already done (a resumed run).
    `show=False` (a non-main rank) shows nothing. `console` (a rich Console) and `clock`
    are seams for tests."""
    how = mode(console) if show else "off"
    args = (label, what, total, unit, start, clock)
    b = _Rich(*args, console=console) if how == "bar" else _Plain(*args) if how == "plain" else Bar(*args)
    try:
        yield b
    except BaseException:
        b.stop()
        raise
    b.close()
