"""A sweep as a Prefect flow (`tuneline sweep`): many configurations of one job, each a DVC
experiment trained and scored on the validation split; only the winner is evaluated on the
test split, registered and gated.

In order:
1. every arm is built and validated, and the sweep says how many arms and about how long,
   before anything runs (tuneline/sweep.py has the spec and the selection);
2. prepare and tokenize run once, in the project (no arm changes them);
3. each arm missing is queued as `dvc exp run --queue --name <sweep>-<i> -S ... validate`
   and DVC's queue worker runs them; arms already run (a sweep killed and run again) are
   not run again;
4. the winner is chosen on the validation split (paired bootstrap against each other arm,
   Holm-corrected over them), and the MLflow parent run gets the summary table and a plot
   of the metric against each swept param; each arm is a child run with its params, its
   training curves and its validation metrics;
5. the winner's params, dvc.lock and outputs are put in the workspace (`sweep_queue.apply`:
   the code stays as it is now), and the pipeline flow runs what is left of it: evaluate
   (the test split, read for this arm only) and register (the gate).
"""

from __future__ import annotations

import json
import os
import sys
import time

from prefect import flow, task
from prefect.exceptions import TerminationSignal
from prefect.states import Failed

from flows.dvc_tasks import changed_inputs, reproduce
from flows.pipeline import pipeline, write_params
from tuneline import ROOT, gitcheck, preflight, recipes, serving, sweep, sweep_queue, sweep_runs
from tuneline.config import Params
from tuneline.data import TOKENIZED_META, VAL_EXAMPLES, metrics_file
from tuneline.errors import TunelineError
from tuneline.io import read_json, write_json
from tuneline.lock import SLOTS_ENV
from tuneline.params_file import read_yaml
from tuneline.stages import stage_names
from tuneline.store import ARMS, tracking_uri
from tuneline.tracking import PARENT_ENV, SWEEP_ENV

DVC = (sys.executable, "-m", "dvc")
TARGET = "validate"  # an arm runs the pipeline up to here: never evaluate, which reads test
INTERRUPTED = (
    "sweep interrupted (its running arm was stopped, the rest taken off DVC's queue). "
    "Fix: run the same command again: finished arms are not run again"
)


def _minutes(s: float) -> str:
    return f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


@task(name="plan-sweep", task_run_name="validate every arm")
def plan(
    recipe: str | None, overrides: list[str], grid: list[str], ranges: list[str], sample: int, jobs: int
) -> tuple[Params, list[sweep.Arm], list[Params]]:
    base = None if recipe else read_yaml(ROOT / "params.yaml", "params.yaml")
    params = recipes.build(recipe, overrides, False, base)
    arms = sweep.arms(sweep.parse_grid(grid, params), sweep.parse_ranges(ranges, params), sample, params.seed)
    sweep.check_keys(arms)
    arm_params = sweep.validate(lambda sets: recipes.build(recipe, [*overrides, *sets], False, base), arms)
    gitcheck.check_committed(ROOT)  # the arms are DVC experiments: commits on top of one
    gitcheck.check_untracked_state(ROOT)
    preflight.check(params)  # the model, the data, the store: after the spec, which fails in a second
    serving.check_champion_task(params)  # the best arm faces register.model_name's champion
    for i, p in enumerate(arm_params, 1):
        if p.model.name != params.model.name or p.train.lora_targets != params.train.lora_targets:
            try:
                preflight.check(p, store=False)
            except TunelineError as e:
                raise TunelineError(f"sweep arm {i} ({sweep.describe(arms[i - 1])}): {e.problem}", e.fix) from None
    if jobs > 1:
        import torch

        gpus = torch.cuda.device_count()
        if jobs > gpus:
            raise TunelineError(
                f"--jobs {jobs} needs {jobs} GPUs (this machine has {gpus}): arms train one per device",
                "use --jobs 1 (arms then train one after another)",
            )
    if len(arms) < 2:
        raise TunelineError("a sweep needs at least two arms", "add values to --grid, or raise --sample")
    return params, arms, arm_params


def _train_rows() -> int | None:
    """Packed training rows of the project's token data (None before tokenize has run)."""
    meta = ROOT / TOKENIZED_META
    return read_json(meta)["splits"]["train"]["rows"] if meta.is_file() else None


def _estimate(params: Params, arm_params: list[Params]) -> tuple[list[float] | None, str]:
    """(each arm's seconds, or None; why there is no estimate)."""
    lock = ROOT / "dvc.lock"
    stages = (read_yaml(lock, "dvc.lock") or {}).get("stages", {}) if lock.is_file() else {}
    if stages and (key := sweep.unlike_last(params, stages)):  # another task or model trained here last
        return None, f"no time estimate (this project last trained with another {key})"
    train, val = (ROOT / metrics_file(s) for s in ("train", "validate"))
    return sweep.estimate_s(
        arm_params,
        read_json(train) if train.is_file() else None,
        read_json(val) if val.is_file() else None,
        _train_rows(),
    ), "no time estimate yet (nothing has trained in this project)"


@task(name="sweep-run", task_run_name="MLflow parent run")
def parent_run(params: Params, arms: list[sweep.Arm], spec: str) -> str:
    return sweep_runs.create_parent(params, arms, spec)


def _shared_stages(params: Params, parent: str) -> None:
    """prepare and tokenize, once, in the project: every arm finds them done."""
    forced = changed_inputs(params)
    os.environ[PARENT_ENV] = parent
    try:
        for name in ("prepare", "tokenize"):
            state = reproduce(name, name in forced, return_state=True)
            if state.is_failed():
                problem, _, fix = (state.message or f"{name} failed").partition(". Fix: ")
                raise TunelineError(problem, fix or "see the stage's output above")
            print(f"[sweep] {name}: {state.result()} (shared by every arm)")
    finally:
        os.environ.pop(PARENT_ENV, None)


def _inputs(arm_params: list[Params]) -> str:
    """What the arms train on besides their params: the prepared and tokenized data (their
    hashes in dvc.lock), the code of train and validate, and the files of a base model that
    is a local folder (new weights under the same model.name are a new sweep)."""
    import yaml

    from tuneline import deps
    from tuneline.modeling import identity

    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    data = {s: [o.get("md5") for o in lock[s].get("outs", [])] for s in ("prepare", "tokenize")}
    found = [data, [deps.code_hash(s) for s in ("train", TARGET)]]
    folders = sorted({identity(p.model.name) for p in arm_params} - {p.model.name for p in arm_params})
    return json.dumps(found + [folders] * bool(folders), sort_keys=True)  # built-in and hub names: as before


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
    sweep_queue.start(jobs, ROOT, DVC, _worker_env(jobs))
    status: dict[str, str] = {}
    asked, done = 0.0, dict.fromkeys(before, "")
    shown, progress = time.time(), {}
    try:
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
                        left = f"; about {_minutes(secs)} left" if secs is not None else ""
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
        # Off the queue first (a worker told to stop still takes the next task), then the
        # running arm stopped (DVC sends it SIGINT). The same command queues them again.
        status = sweep_queue.queue_status(ROOT, DVC)
        queued = [n for n in names if status.get(n) == "Queued"]
        if queued:
            sweep_queue.run_dvc(["queue", "remove", *queued], ROOT, DVC, check=False)
        running = [n for n in names if status.get(n) == "Running"]
        if running:
            sweep_queue.run_dvc(["queue", "kill", *running], ROOT, DVC, check=False)
        sweep_queue.run_dvc(["queue", "stop"], ROOT, DVC, check=False)
        sweep_runs.abandon(parent, running)  # stopped between two stages, its run says FINISHED
        raise


def _arm_results(names: list[str]) -> tuple[dict[str, dict], dict[str, str]]:
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


@task(name="select-winner", task_run_name="winner on validation")
def choose(params: Params, names: list[str], results: dict[str, dict]) -> sweep.Selection:
    from tuneline import scoring, tasks
    from tuneline.evaluation import test_rows

    keys = {r["examples"]["examples_key"] for r in results.values()}
    if len(keys) != 1:
        raise TunelineError(
            "the sweep's arms were scored on different validation examples",
            "sweep train.* or model.name only, and run the sweep again",
        )
    rows, _ = test_rows(params, "val")
    task_, metric = tasks.TASKS[params.prepare.task], params.primary_metric()
    stats = [scoring.stat(task_, metric, rows, results[n]["examples"]["tuned"], params.prepare.labels) for n in names]
    return sweep.select(stats, metric, params.register.alpha, params.evaluate.n_bootstrap)


def _winner_through_the_gate(name: str, parent: str) -> dict:
    """The winner in the workspace (params.yaml, dvc.lock and its model from DVC's cache),
    then the pipeline flow runs what it lacks: evaluate on the test split, and register."""
    names = stage_names()
    sweep_queue.apply(name, ROOT, DVC, keep=names[names.index(TARGET) + 1 :])  # evaluate, register: no arm runs them
    os.environ[SWEEP_ENV] = parent  # the winner's pipeline run nests under the sweep's
    try:
        state = pipeline(return_state=True)
    finally:
        os.environ.pop(SWEEP_ENV, None)
    if not state.is_completed():
        failed = state.result(raise_on_failure=False)
        raise failed if isinstance(failed, TunelineError) else TunelineError(state.message or "the winner's run failed")
    return state.result()


def _spec(grid: list[str], ranges: list[str], sample: int) -> str:
    return " ".join(
        [*(f"--grid {g}" for g in grid), *([f"--sample {sample}"] if ranges else []), *(f"--range {r}" for r in ranges)]
    )


@flow(name="tuneline-sweep", log_prints=True)
def sweep_flow(
    recipe: str | None = None,
    overrides: list[str] | None = None,
    grid: list[str] | None = None,
    ranges: list[str] | None = None,
    sample: int = 0,
    jobs: int = 1,
    dry_run: bool = False,
):
    """Train and score every arm on validation, then send the winner through evaluate and
    the gate. Returns {"sweep", "arms", "winner", ...}; a refused sweep ends Failed with
    the one line naming the problem and the fix."""
    try:
        return _sweep(recipe, list(overrides or []), list(grid or []), list(ranges or []), sample, jobs, dry_run)
    except TunelineError as e:
        return Failed(message=str(e), data={"exit_code": 2})
    except KeyboardInterrupt:
        return Failed(message=INTERRUPTED, data={"exit_code": 130})


def _sweep(recipe, overrides, grid, ranges, sample, jobs, dry_run) -> dict:
    t0 = time.time()
    params, arms, arm_params = plan(recipe, overrides, grid, ranges, sample, jobs)
    estimates, why_not = _estimate(params, arm_params)
    est = sum(estimates) if estimates else None
    print(
        f"[sweep] {len(arms)} arms ({_spec(grid, ranges, sample)}), each trained and scored on the validation "
        "split; " + (f"about {_minutes(est)} (from this project's last training)" if est else why_not)
    )
    for i, arm in enumerate(arms, 1):
        print(f"[sweep]   arm {i}: {sweep.describe(arm)}")
    if dry_run:
        return {"arms": arms, "estimate_s": est}
    if recipe or overrides:
        write_params(
            params, f"Written by `tuneline sweep` as the base of its arms ({time.strftime('%Y-%m-%d %H:%M')})."
        )
    parent = parent_run(params, arms, _spec(grid, ranges, sample))
    from mlflow import MlflowClient

    client = MlflowClient()
    try:
        _shared_stages(params, parent)
        sweep.check_arms(arms, arm_params, _train_rows())
        # the same arms on the same data and code are the same sweep: its DVC experiments
        name = sweep.name(arm_params, _inputs(arm_params))
        parent = sweep_runs.named(parent, name)
        names = [f"{name}-{i}" for i in range(1, len(arms) + 1)]
        print(f"[sweep] {name}: the arms are the DVC experiments {names[0]} to {names[-1]}")
        queued = _queue_missing(arms, names, parent)
        if queued or any(
            s in ("Queued", "Running") for n, s in sweep_queue.queue_status(ROOT, DVC).items() if n in names
        ):
            run_arms(names, arms, jobs, params.primary_metric(), parent, estimates)
        results, failed = _arm_results(names)
        for n, why in failed.items():
            print(f"[sweep] {n} failed: {why}")
        if len(results) < 2:
            raise TunelineError(
                f"only {len(results)} of {len(arms)} sweep arms finished",
                f"see `dvc queue logs {next(iter(failed), names[0])}`; fix it and run the same command again",
            )
        ok = [i for i, n in enumerate(names) if n in results]
        names_ok, arms_ok, params_ok = [names[i] for i in ok], [arms[i] for i in ok], [arm_params[i] for i in ok]
        metric = params.primary_metric()
        sel = choose(params, names_ok, results)
        sweep_runs.record(parent, names_ok, arms_ok, params_ok, results, sel, metric)
        winner = names_ok[sel.winner]
        print(f"[sweep] validation {metric}, paired bootstrap against the winner, Holm over {len(ok) - 1} comparisons:")
        for i, n in enumerate(names_ok):
            c = sel.comparisons[i]
            vs = (
                "winner"
                if c is None
                else (
                    f"winner {c.delta:+.3g} [{c.ci_low:+.3g}, {c.ci_high:+.3g}], p={c.p_value:.3g}"
                    f"{' (beaten)' if sel.beaten[i] else ' (not separable)'}"
                )
            )
            print(f"[sweep]   {n} ({sweep.describe(arms_ok[i])}): {metric}={sel.values[i]:.4g}  {vs}")
        if not sel.clear():
            print(
                "[sweep] note: the winner does not beat every arm after the correction; it goes to the gate as the best on validation"
            )
        print(
            f"[sweep] winner {winner} ({sweep.describe(arms_ok[sel.winner])}): evaluate on the test split, then the gate"
        )
        stages = _winner_through_the_gate(winner, parent)
        evaluated = read_json(ROOT / metrics_file("evaluate"))
        out = {
            "sweep": name,
            "arms": {n: results[n]["metrics"][metric] for n in names_ok},
            "failed": failed,
            "winner": winner,
            "clear": sel.clear(),
            "test": evaluated["tuned"][metric],
            "metric": metric,
            "stages": stages,
            "total_s": time.time() - t0,
        }
        reg = ROOT / metrics_file("register")
        if not params.register.dry_run and reg.is_file():
            out["gate"] = read_json(reg).get("gate", {}).get("decision")
        client.log_metric(parent, f"winner_test_{metric}", out["test"])
        client.set_tag(parent, "tuneline.sweep.gate", str(out.get("gate")))
        client.log_metric(parent, "sweep_wall_s", out["total_s"])
        client.set_terminated(parent, "FINISHED")
        return out
    except BaseException as e:
        client.set_terminated(parent, "KILLED" if isinstance(e, STOPPED) else "FAILED")
        raise
