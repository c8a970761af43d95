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
import time

from prefect import flow, task
from prefect.states import Failed

from flows import sweep_arms
from flows.dvc_tasks import changed_inputs, reproduce
from flows.pipeline import pipeline, write_params
from flows.sweep_arms import DVC, STOPPED, TARGET, minutes, run_arms
from tuneline import ROOT, gitcheck, preflight, recipes, serving, sweep, sweep_queue, sweep_runs
from tuneline.config import Params
from tuneline.data import TOKENIZED_META, metrics_file
from tuneline.errors import TunelineError
from tuneline.io import read_json
from tuneline.params_file import read_yaml
from tuneline.stages import stage_names
from tuneline.tracking import PARENT_ENV, SWEEP_ENV

INTERRUPTED = (
    "sweep interrupted (its running arm was stopped, the rest taken off DVC's queue). "
    "Fix: run the same command again: finished arms are not run again"
)


@task(name="plan-sweep", task_run_name="validate every arm")
def plan(
    recipe: str | None, overrides: list[str], grid: list[str], ranges: list[str], sample: int, jobs: int
) -> tuple[Params, list[sweep.Arm], list[Params]]:
    base = None if recipe else read_yaml(ROOT / "params.yaml", "params.yaml")
    params = recipes.build(recipe, overrides, False, base)
    arms = sweep.arms(sweep.parse_grid(grid, params), sweep.parse_ranges(ranges, params), sample, params.seed)
    sweep.check_keys(arms)
    sweep.check_overrides(overrides, arms)
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
        "split; " + (f"about {minutes(est)} (from this project's last training)" if est else why_not)
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
        if sweep_arms.queue_arms(arms, names, parent):
            run_arms(names, arms, jobs, params.primary_metric(), parent, estimates)
        results, failed = sweep_arms.results(names)
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
