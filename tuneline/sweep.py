"""Sweeps (#22): many configurations of one job as DVC experiments, compared on the
validation split, with only the winner evaluated on the test split and gated.

This module holds what decides before and after the arms run; the calls into DVC's queue are
tuneline/sweep_queue.py, and the flow that puts them in order is flows/sweep.py (`tuneline sweep`).
- The spec: a grid (`--grid train.lr=1e-4,5e-4,2e-3`; several --grid make the Cartesian
  product), or `--sample N` seeded draws over `--range train.lr=1e-5:1e-3` (log-uniform when
  both ends are positive and a decade or more apart, else uniform; integers stay integers)
  or `--range train.lora_r=8,16,32` (a choice). Every arm is validated before anything runs.
- Arms may vary `train.*` and `model.name` only: anything else changes the validation
  examples or how they are scored, and the arms would not be compared on the same footing.
- Each arm is `dvc exp run --queue --name <sweep>-<i> -S key=value ... validate`, run by
  DVC's own queue worker: prepare and tokenize are unchanged in every arm, so DVC reuses
  them; `dvc exp show` lists the arms with their params and metrics. An arm queued again
  with the same name is already an experiment (or, with the same params, in DVC's run
  cache): a killed sweep re-run costs only the missing arms.
- The winner: the best arm on the primary metric, compared with each other arm by paired
  bootstrap on the same validation examples, the k-1 p-values Holm-corrected together.
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
    if ranges and n_sample < 1:  # `--range` alone: how many arms to draw is not said
        raise TunelineError("--range needs --sample N, the number of arms to draw from it", "add e.g. --sample 4")
    if not ranges:
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


SWEEPABLE = ("train.", "model.name")


def check_overrides(sets: list[str], arms_: list[Arm]) -> None:
    """A key that --set gives every arm and the sweep varies: each arm's value would replace
    the --set one unsaid."""
    varied = dict.fromkeys(k for arm in arms_ for k in arm)
    for item in sets:
        key = item.partition("=")[0].strip()
        if key in varied:
            raise TunelineError(
                f"--set '{item}' gives '{key}' to every arm, and the sweep varies it: each arm's value would replace it",
                f"drop --set {key}, or leave '{key}' out of --grid/--range",
            )


def check_keys(arms_: list[Arm]) -> None:
    """Arms may vary how the model is trained, not the data or the scoring."""
    for key in dict.fromkeys(k for arm in arms_ for k in arm):
        if not key.startswith(SWEEPABLE):
            raise TunelineError(
                f"a sweep cannot vary '{key}': it changes the validation examples or how they are scored, "
                "so the arms would not be compared on the same examples",
                "sweep train.* or model.name; set other keys for every arm with --set",
            )


def name(arm_params: list[Params], inputs: str = "") -> str:
    """The same arms (every param of each) on the same inputs (`inputs`: the data and the
    code they train on) get the same name, so running a sweep's command again finds the
    arms it already ran, even after its winner was applied to params.yaml; new data or code
    make a new sweep."""
    import hashlib
    import json

    blob = json.dumps([[p.model_dump(mode="json") for p in arm_params], inputs], sort_keys=True, default=str)
    return "sweep-" + hashlib.sha256(blob.encode()).hexdigest()[:6]


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


def check_arms(arms_: list[Arm], arm_params: list[Params], train_rows: int) -> None:
    """After tokenize, before any arm trains (the packed row count is known only then):
    refuse an arm that train would refuse (`training.check_accumulation`), naming it."""
    from tuneline.training import check_accumulation

    for i, (arm, p) in enumerate(zip(arms_, arm_params), 1):
        try:
            check_accumulation(train_rows, p.train, p.train.nproc)
        except TunelineError as e:
            raise TunelineError(f"sweep arm {i} ({describe(arm)}): {e.problem}", e.fix) from None


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


def unlike_last(params: Params, lock_stages: dict) -> str | None:
    """The first param by which the sweep's data or model differ from what this project last
    prepared, tokenized and trained (dvc.lock's stages), or None: only then do its step time
    and packed rows say how long the sweep's arms take."""
    flat, differ = flatten(params), []
    for stage in ("prepare", "tokenize", "train"):
        recorded = (lock_stages.get(stage) or {}).get("params", {}).get("params.yaml", {})
        differ += [k for k, v in recorded.items() if (stage != "train" or k == "model.name") and flat.get(k) != v]
    telling = ("prepare.task", "model.name", "prepare.source")  # named first: what a user recognises
    return min(differ, key=lambda k: telling.index(k) if k in telling else len(telling), default=None)


def estimate_s(
    arm_params: list[Params], last_train: dict | None, last_val: dict | None, n_rows: int | None
) -> list[float] | None:
    """Seconds each arm will take, from this project's last training (seconds per optimizer
    step of the same model) and validation; None when nothing has trained here yet."""
    from tuneline.training import total_steps

    if not last_train or not n_rows or not last_train.get("steps"):
        return None
    per_step = last_train["train_s"] / last_train["steps"]
    val_s = (last_val or {}).get("generation_s", 0.0)
    return [per_step * total_steps(n_rows, p.train) + val_s + 30 for p in arm_params]


def time_left(left: list[int], took: dict[int, float], estimates: list[float] | None, jobs: int) -> float | None:
    """Seconds the arms `left` (indices) will take: what the arms that trained in this sweep
    took on average (`took`: index -> seconds), else the estimates. An arm done in under a
    third of its estimate was restored from DVC's run cache (the same params and data ran
    before, e.g. the pipeline's own run), not trained: it says nothing about the others."""
    trained = [t for i, t in took.items() if not estimates or t >= estimates[i] / 3]
    if trained:
        return sum(trained) / len(trained) * len(left) / jobs
    return sum(estimates[i] for i in left) / jobs if estimates else None
