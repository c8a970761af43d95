"""Sweeps (#22), the parts that decide before and after the arms run: the spec (a grid, or a
seeded sample over ranges), every arm validated before anything runs, and the winner chosen
on the validation split with the number of arms accounted for.

NOT YET BUILT (work in progress on this branch): running the arms as DVC experiments
(`dvc exp run --queue -S ...`, DVC's queue), scoring each arm on the validation split, the
MLflow parent and child runs, `--jobs N`, resume, scheduling, and the `tuneline sweep`
command.

The plan for the rest, with what was checked here (DVC 3.67.1, offline, a toy 2-stage
pipeline in /tmp): `dvc exp run --queue -S b=3` queues an arm; `dvc queue start -j 1`
starts DVC's own worker, which runs them one by one (`dvc queue status`, `dvc queue logs
NAME`); an unchanged first stage is skipped in every arm ("didn't change"), and an arm
queued again with the same params is restored from the run cache ("is cached - skipping
run"): so prepare/tokenize run once and a killed sweep re-run costs only the missing arms.
`dvc exp show --csv` lists each arm's params and metrics. Still to decide: how an arm
scores on validation without the evaluate stage (which reads test): probably a target
stage that scores the val split, queued as `dvc exp run --queue -S ... <that stage>`.

Spec syntax, as `--set`'s: `--grid train.lr=1e-4,5e-4,2e-3` (one axis; several --grid make
the Cartesian product), `--sample N` with `--range train.lr=1e-5:1e-3` (log-uniform when
both ends are positive and a decade or more apart, else uniform; integers stay integers)
or `--range train.lora_r=8,16,32` (a choice).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Any

import yaml

from tuneline import scoring
from tuneline.config import Params, flatten
from tuneline.errors import TunelineError

Arm = dict[str, Any]  # dotted param key -> value


def _key_and_values(item: str, flag: str) -> tuple[str, str]:
    key, eq, values = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise TunelineError(f"{flag} '{item}' is not key=values", f"write e.g. {flag} train.lr=1e-4,5e-4")
    return key, values.strip()


def _scalar(text: str) -> Any:
    """A value as --set reads it, but numbers as numbers (YAML 1.1 reads 1e-4 as text)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _known(key: str, known: dict[str, Any], flag: str, item: str) -> None:
    if key not in known:
        import difflib

        close = difflib.get_close_matches(key, list(known), n=1)
        raise TunelineError(
            f"{flag} '{item}': unknown param '{key}'",
            f"did you mean '{close[0]}'?" if close else "see params.yaml for the keys",
        )


def parse_grid(items: list[str], defaults: Params) -> dict[str, list]:
    """--grid items -> {key: [values]}, in the order given."""
    known, axes = flatten(defaults), {}
    for item in items:
        key, text = _key_and_values(item, "--grid")
        _known(key, known, "--grid", item)
        values = [_scalar(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise TunelineError(f"--grid '{item}' has no values", f"list them, e.g. --grid {key}=1,2")
        if key in axes:
            raise TunelineError(f"--grid gives '{key}' twice", "list all its values in one --grid")
        if len(set(map(repr, values))) < len(values):
            raise TunelineError(f"--grid '{item}' repeats a value", "list each value once")
        axes[key] = values
    return axes


@dataclass(frozen=True)
class Range:
    key: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()

    def draw(self, rng: random.Random) -> Any:
        if self.choices:
            return rng.choice(self.choices)
        lo, hi = self.low, self.high
        integer = float(lo).is_integer() and float(hi).is_integer() and isinstance(lo, int)
        if lo > 0 and hi / lo >= 10:  # log-uniform over decades
            x = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        else:
            x = rng.uniform(lo, hi)
        return round(x) if integer else float(f"{x:.3g}")


def parse_ranges(items: list[str], defaults: Params) -> list[Range]:
    known, out = flatten(defaults), []
    for item in items:
        key, text = _key_and_values(item, "--range")
        _known(key, known, "--range", item)
        if any(r.key == key for r in out):
            raise TunelineError(f"--range gives '{key}' twice", "give each key one range")
        if ":" in text:
            lo, _, hi = text.partition(":")
            lo, hi = _scalar(lo), _scalar(hi)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or not lo < hi:
                raise TunelineError(
                    f"--range '{item}' is not low:high with low < high", f"e.g. --range {key}=1e-5:1e-3"
                )
            out.append(Range(key, lo, hi))
        else:
            choices = tuple(_scalar(v.strip()) for v in text.split(",") if v.strip())
            if not choices:
                raise TunelineError(f"--range '{item}' has no values", f"e.g. --range {key}=8,16,32")
            out.append(Range(key, choices=choices))
    return out


def arms(grid: dict[str, list], ranges: list[Range] = (), n_sample: int = 0, seed: int = 0) -> list[Arm]:
    """The grid's Cartesian product, or `n_sample` seeded draws from the ranges (distinct
    arms only; the same seed gives the same arms)."""
    if grid and ranges:
        raise TunelineError("a sweep is a --grid or a --sample over --range, not both", "choose one")
    if grid:
        keys = list(grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    if not ranges or n_sample < 1:
        raise TunelineError("nothing to sweep", "give --grid KEY=V1,V2, or --sample N with --range KEY=LOW:HIGH")
    rng, out, seen = random.Random(f"sweep-{seed}"), [], set()
    for _ in range(n_sample * 20):
        arm = {r.key: r.draw(rng) for r in ranges}
        if repr(arm) not in seen:
            seen.add(repr(arm))
            out.append(arm)
        if len(out) == n_sample:
            break
    return out


def describe(arm: Arm) -> str:
    return ", ".join(f"{k}={v}" for k, v in arm.items())


def validate(build, arms_: list[Arm]) -> list[Params]:
    """Every arm's params, or one line naming the first arm that is invalid and why.
    `build(sets)` makes the params of one run from `--set` strings (recipe and --set
    already bound)."""
    out = []
    for i, arm in enumerate(arms_, 1):
        try:
            out.append(build([f"{k}={v}" for k, v in arm.items()]))
        except TunelineError as e:
            raise TunelineError(f"sweep arm {i} ({describe(arm)}): {e.problem}", e.fix) from None
    return out


@dataclass(frozen=True)
class Selection:
    winner: int  # index of the best arm on the metric
    values: list[float]  # each arm's metric on the validation split
    comparisons: list[scoring.Comparison | None]  # winner against each arm (None: itself)
    beaten: list[bool]  # the winner is better than this arm at family-wise level alpha (Holm)

    def clear(self) -> bool:
        """The winner beats every other arm after the multiplicity correction."""
        return all(b for i, b in enumerate(self.beaten) if i != self.winner)


def select(stats: list[scoring.Stat], metric: str, alpha: float = 0.05, n_boot: int = 1000) -> Selection:
    """The best arm on `metric` (per-example statistics on the same validation examples),
    compared with each other arm by paired bootstrap; the k-1 comparisons are Holm-corrected
    together, so that "the winner is better than arm j" holds at family-wise level alpha."""
    if len(stats) < 2:
        raise TunelineError("a sweep needs at least two arms", "add values to --grid, or raise --sample")
    values = [s.value() for s in stats]
    sign = -1 if metric in scoring.LOWER_IS_BETTER else 1
    winner = max(range(len(values)), key=lambda i: (not math.isnan(values[i]), sign * values[i], -i))
    comps: list[scoring.Comparison | None] = [
        None if i == winner else scoring.compare(stats[winner], s, metric, "bootstrap", n_boot)
        for i, s in enumerate(stats)
    ]
    others = [i for i in range(len(stats)) if i != winner]
    rejected = scoring.holm([comps[i].p_value for i in others], alpha)
    beaten = [False] * len(stats)
    for i, r in zip(others, rejected):
        beaten[i] = r
    return Selection(winner, values, comps, beaten)


# --- arms as DVC experiments ------------------------------------------------------------------


def queue(arms_: list[Arm], target: str | None = None, name: str = "sweep", cwd=None, dvc=("dvc",)) -> list[str]:
    """Queue each arm as a DVC experiment (`dvc exp run --queue -S key=value ... [target]`),
    named `<name>-<i>`; returns the names. DVC runs them (`run_queue`) and keeps them:
    `dvc exp show` lists each with its params and metrics."""
    import subprocess

    names = []
    for i, arm in enumerate(arms_, 1):
        exp = f"{name}-{i}"
        cmd = [*dvc, "exp", "run", "--queue", "--name", exp]
        for k, v in arm.items():
            cmd += ["-S", f"{k}={v}"]
        if target:
            cmd.append(target)
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if done.returncode:
            raise TunelineError(
                f"could not queue sweep arm {i} ({describe(arm)}): {(done.stderr or done.stdout).strip()[-300:]}",
                "see `dvc queue status`; `dvc queue remove --queued` clears the queue",
            )
        names.append(exp)
    return names


def run_queue(jobs: int = 1, cwd=None, dvc=("dvc",), poll: float = 2.0, timeout: float | None = None) -> dict:
    """Start DVC's queue worker(s) and wait until no arm is queued or running; returns
    {experiment name: status} from `dvc queue status`."""
    import subprocess
    import time

    subprocess.run([*dvc, "queue", "start", "-j", str(jobs)], cwd=cwd, check=True, capture_output=True, text=True)
    deadline = None if timeout is None else time.time() + timeout
    while True:
        out = subprocess.run([*dvc, "queue", "status"], cwd=cwd, check=True, capture_output=True, text=True).stdout
        status = {}  # rows: task, name, created (two words), status; no --json for this command
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 4 and parts[-1] in ("Queued", "Running", "Success", "Failed"):
                status[parts[1]] = parts[-1]
        if not any(s in ("Queued", "Running") for s in status.values()):
            return status
        if deadline is not None and time.time() > deadline:
            raise TunelineError("the sweep's queue did not finish in time", "see `dvc queue status`")
        time.sleep(poll)
