"""Sweeps (#22): many configurations of one job as DVC experiments, compared on the
validation split, with only the winner evaluated on the test split and gated.

This module holds what decides before and after the arms run, and the calls into DVC; the
flow that puts them in order is flows/sweep.py (`tuneline sweep`).
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
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tuneline import scoring
from tuneline.config import Params, flatten
from tuneline.errors import TunelineError, dvc_message

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


SWEEPABLE = ("train.", "model.name")


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


def estimate_s(
    arm_params: list[Params], last_train: dict | None, last_val: dict | None, n_rows: int | None
) -> float | None:
    """Seconds the arms will take, from this project's last training (seconds per optimizer
    step of the same model) and validation; None when nothing has trained here yet."""
    from tuneline.training import total_steps

    if not last_train or not n_rows or not last_train.get("steps"):
        return None
    per_step = last_train["train_s"] / last_train["steps"]
    val_s = (last_val or {}).get("generation_s", 0.0)
    return sum(per_step * total_steps(n_rows, p.train) + val_s + 30 for p in arm_params)


# --- arms as DVC experiments ------------------------------------------------------------------


def run_dvc(args: list[str], cwd, dvc, check: bool = True) -> str:
    done = subprocess.run([*dvc, *args], cwd=cwd, capture_output=True, text=True)
    if check and done.returncode:
        raise TunelineError(
            f"`dvc {' '.join(args[:3])}` failed: {dvc_message(done.stderr or done.stdout)[-300:]}",
            "see `dvc queue status` and `dvc queue logs NAME`; `dvc queue remove --queued` clears the queue",
        )
    return done.stdout


def untracked(paths: list[str], cwd=None) -> list[str]:
    """What of `paths` git does not track, as `dvc exp run --copy-paths` takes it: a file
    whose folder git tracks something in, else the folder (DVC copies into the experiment's
    copy of the project, which only has the folders git knows)."""
    from pathlib import PurePosixPath

    def tracked(path: str) -> bool:
        out = subprocess.run(["git", "ls-files", "--", path], cwd=cwd, capture_output=True, text=True).stdout
        return bool(out.strip())

    out: list[str] = []
    for path in paths:
        folder = str(PurePosixPath(path).parent)
        if tracked(path):
            continue
        item = path if folder == "." or tracked(folder) else folder
        if item not in out:
            out.append(item)
    return out


def queue(
    arms_: list[Arm], names: list[str], target: str | None = None, cwd=None, dvc=("dvc",), copy: list[str] = ()
) -> None:
    """Queue each arm as a DVC experiment named as given (`dvc exp run --queue --name NAME
    -S key=value ... [target]`). DVC's worker runs them (`start`) and keeps them: `dvc exp
    show` lists each with its params and metrics. A queued experiment starts from git's view
    of the project (the commit and the changes DVC stashes for it): `copy` names what it
    needs that git does not track (`untracked`)."""
    for arm, exp in zip(arms_, names):
        args = ["exp", "run", "--queue", "--name", exp, *(a for path in copy for a in ("--copy-paths", path))]
        for k, v in arm.items():
            args += ["-S", f"{k}={v}"]
        run_dvc(args + ([target] if target else []), cwd, dvc)


STATES = ("Failed", "Success", "Queued", "Running")  # a name queued again has its old rows too: the later state wins


def queue_status(cwd=None, dvc=("dvc",)) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} from `dvc queue status`, and
    under the key WORKERS the number of active workers ('0' when none runs)."""
    import re

    out = run_dvc(["queue", "status"], cwd, dvc)
    status = {}  # rows: task, name, created (two words), status; no --json for this command
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 4 and parts[-1] in STATES:
            if STATES.index(parts[-1]) >= STATES.index(status.get(parts[1], "Failed")):
                status[parts[1]] = parts[-1]
    found = re.search(r"Worker status: (\d+) active", out)
    status[WORKERS] = found.group(1) if found else "0"
    return status


WORKERS = "<workers>"


def start(jobs: int = 1, cwd=None, dvc=("dvc",), env=None) -> None:
    """Start DVC's queue worker(s); they run the queued arms, `jobs` at a time."""
    # The worker DVC spawns outlives this call and keeps the pipes it was given: capturing
    # its output would wait for the whole queue. Its log is `dvc queue logs NAME`.
    done = subprocess.run(
        [*dvc, "queue", "start", "-j", str(jobs)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if done.returncode:
        raise TunelineError("DVC's queue worker did not start", "run `dvc queue start` to see why")


def experiments(cwd=None) -> dict[str, str]:
    """{experiment name: commit} of every DVC experiment in the project (its git refs under
    refs/exps/, whatever commit it was run from)."""
    out = subprocess.run(
        ["git", "for-each-ref", "refs/exps", "--format=%(refname) %(objectname)"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = {}
    for line in out.splitlines():
        ref, _, sha = line.partition(" ")
        if ref.count("/") >= 4 and not ref.startswith(("refs/exps/celery", "refs/exps/exec")):
            found[ref.rsplit("/", 1)[-1]] = sha
    return found


def apply(name: str, cwd, dvc, keep: list[str] = ()) -> list[str]:
    """Put experiment `name`'s own changes in the workspace: the files its commit changed
    from its baseline (params.yaml, dvc.lock, metrics, uncached reports), then its outputs
    from DVC's cache. Returns those files.

    Not `dvc exp apply`: that checks out the experiment's whole tree, so code committed
    since the arm was queued (a sweep resumed after a fix) went back to the arm's version
    in the workspace, and the winner was evaluated and registered with that old code. Here
    the code stays as it is; a stage whose code changed since (evaluate, register: the
    sweep's id covers train's and validate's) is stale to DVC and runs with today's code.

    `keep`: stages the arm did not run (those after its target). Their dvc.lock entries and
    outputs stay the workspace's: DVC then re-runs them only when what they read changed,
    so a finished sweep run again does not evaluate and register its winner twice."""
    rev = experiments(cwd).get(name)
    if rev is None:
        raise TunelineError(f"experiment '{name}' not found", "see `dvc exp show -A`; run the sweep again")

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout

    lock = Path(cwd or ".") / "dvc.lock"
    ours = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}
    kept = {s: ours[s] for s in keep if s in ours}
    kept_outs = {o["path"] for entry in kept.values() for o in entry.get("outs", [])}
    changed = git("diff", "--name-only", "--no-renames", "--diff-filter=AM", f"{rev}^", rev).split()
    changed = [f for f in changed if f not in kept_outs]
    if changed:
        git("restore", f"--source={rev}", "--worktree", "--", *changed)
    if kept and "dvc.lock" in changed:
        theirs = yaml.safe_load(lock.read_text())
        theirs.setdefault("stages", {}).update(kept)
        lock.write_text(yaml.safe_dump(theirs, sort_keys=False))
    run_dvc(["checkout", "--force"], cwd, dvc)
    return changed


def read_at(commit: str, path: str, cwd=None) -> str | None:
    """A file as an experiment committed it (metrics and uncached reports are in git)."""
    done = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=cwd, capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def failure(log: str) -> str:
    """Why an arm failed, from its queue log: the stage's own line (`error: … Fix: …`), not
    DVC's "failed to reproduce 'train'" after it, which says only that the stage exited."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    ours = [line for line in lines if "Fix:" in line]
    return (ours or [line for line in lines if "ERROR" in line] or lines or ["no log"])[-1][:400]


def last_progress(name: str, cwd=None) -> str | None:
    """The newest line a running arm printed (`[train] 41/102 steps (40%) 182 tok/s, ETA
    5m40s`), read from the log file DVC's queue writes for it: no DVC process, so it can be
    asked often beside a training arm. None when the arm has no log yet (or prints nothing).

    DVC's queue keeps each task in .dvc/tmp/exps/run/<task>/: `<task>.run` (the executor's
    info, with the experiment's name) and `<task>.out` (its output; `dvc queue logs`)."""
    import json

    logs = []  # an arm queued again (a resumed sweep) has its old task's log too: the newest is its
    for info in (Path(cwd or ".") / ".dvc" / "tmp" / "exps" / "run").glob("*/*.run"):
        try:
            if json.loads(info.read_text()).get("name") == name:
                out = info.with_suffix(".out")
                logs.append((out.stat().st_mtime, out))
        except (OSError, ValueError):  # written or removed as we read: not this time
            continue
    if not logs:
        return None
    try:
        with open(max(logs)[1], "rb") as f:
            f.seek(max(f.seek(0, 2) - 4096, 0))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in tail.replace("\r", "\n").splitlines()]
    stages = [line for line in lines if line.startswith("[") and "]" in line]
    return stages[-1] if stages else None
