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
5. `dvc exp apply <winner>` puts the winner in the workspace, and the pipeline flow runs
   what is left of it: evaluate (the test split, read for this arm only) and register (the
   gate).
"""

from __future__ import annotations

import json
import os
import sys
import time

from prefect import flow, task
from prefect.states import Failed

from flows.pipeline import changed_inputs, pipeline, reproduce, write_params
from tuneline import ROOT, preflight, recipes, sweep
from tuneline.config import Params, read_yaml
from tuneline.data import VAL_EXAMPLES, metrics_file
from tuneline.errors import TunelineError
from tuneline.io import read_json, write_json
from tuneline.lock import SLOTS_ENV
from tuneline.tracking import ARMS, PARENT_ENV, SWEEP_ENV, log_params, setup, tracking_uri

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
    preflight.check(params)  # the model, the data, the store: after the spec, which fails in a second
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


def _estimate(arm_params: list[Params]) -> float | None:
    train, val = (ROOT / metrics_file(s) for s in ("train", "validate"))
    meta = ROOT / "data/tokenized/meta.json"
    rows = read_json(meta)["splits"]["train"]["rows"] if meta.is_file() else None
    return sweep.estimate_s(
        arm_params,
        read_json(train) if train.is_file() else None,
        read_json(val) if val.is_file() else None,
        rows,
    )


@task(name="sweep-run", task_run_name="MLflow parent run")
def parent_run(params: Params, arms: list[sweep.Arm], spec: str) -> str:
    """The sweep's MLflow run, before its name is known (that needs the shared stages)."""
    from mlflow import MlflowClient

    exp_id = setup(params.register.experiment)
    client = MlflowClient()
    run = client.create_run(
        exp_id,
        tags={
            "mlflow.runName": "sweep",
            "tuneline.kind": "sweep",
            "tuneline.sweep.spec": spec,
            "tuneline.sweep.arms": str(len(arms)),
        },
    )
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def _named(parent: str, name: str) -> str:
    """Name the sweep's run; when the same sweep ran before (its command run again), carry
    on in that run instead: its arms are there."""
    from mlflow import MlflowClient

    client = MlflowClient()
    exp_id = client.get_run(parent).info.experiment_id
    found = client.search_runs([exp_id], filter_string=f"tags.`tuneline.sweep` = '{name}'", max_results=1)
    if not found:
        client.set_tag(parent, "tuneline.sweep", name)
        client.set_tag(parent, "mlflow.runName", name)
        return parent
    earlier = found[0].info.run_id
    for run in client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"):
        client.set_tag(run.info.run_id, "mlflow.parentRunId", earlier)  # this time's prepare/tokenize
    client.delete_run(parent)
    client.update_run(earlier, status="RUNNING")
    return earlier


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


def _inputs() -> str:
    """What the arms train on besides their params: the prepared and tokenized data (their
    hashes in dvc.lock) and the code of train and validate."""
    import yaml

    from tuneline import deps

    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    data = {s: [o.get("md5") for o in lock[s].get("outs", [])] for s in ("prepare", "tokenize")}
    return json.dumps([data, [deps.code_hash(s) for s in ("train", TARGET)]], sort_keys=True)


def _queue_missing(arms: list[sweep.Arm], names: list[str], parent: str) -> list[str]:
    """Queue the arms not already run or queued; returns their names."""
    done, status = sweep.experiments(ROOT), sweep.queue_status(ROOT, DVC)
    # "Running" with no worker alive: the arm of a sweep whose worker died with it
    stale = [n for n in names if status.get(n) == "Running" and status[sweep.WORKERS] == "0"]
    if stale:
        sweep._dvc(["queue", "kill", *stale], ROOT, DVC, check=False)
        status |= dict.fromkeys(stale, "Failed")
    (ROOT / ARMS).mkdir(parents=True, exist_ok=True)
    todo = []
    for arm, name in zip(arms, names):
        # what the arm's stages read: the sweep's run and store (tracking.arm_record)
        write_json(ROOT / ARMS / f"{name}.json", {"sweep_run_id": parent, "tracking_uri": tracking_uri()})
        if name in done or status.get(name) in ("Queued", "Running"):
            continue
        if status.get(name) == "Failed":  # a killed or failed arm: run it again
            sweep._dvc(["queue", "remove", name], ROOT, DVC, check=False)
        todo.append((arm, name))
    if len(todo) < len(arms):
        print(f"[sweep] {len(arms) - len(todo)} of {len(arms)} arms already run or queued: not run again")
    _queue(todo)
    return [n for _, n in todo]


def _queue(todo: list[tuple[sweep.Arm, str]]) -> None:
    # What the arms start from besides git's view: the shared stages' record and metrics.
    # (Untracked, e.g. in a new project, every arm would run prepare and tokenize again.)
    shared = ["dvc.lock", *(str(metrics_file(s)) for s in ("prepare", "tokenize"))]
    sweep.queue([a for a, _ in todo], [n for _, n in todo], TARGET, ROOT, DVC, sweep.untracked(shared, ROOT))


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


@task(name="run-arms", task_run_name="run the arms (DVC queue)")
def run_arms(names: list[str], arms: list[sweep.Arm], jobs: int, metric: str) -> dict[str, str]:
    """Start DVC's worker and wait for this sweep's arms, saying when each one ends."""
    t0, idle, restarts = time.time(), 0.0, 0
    before = set(sweep.experiments(ROOT))
    seen = {n: "Success" for n in names if n in before}  # run before (a sweep run again): not reported
    sweep.start(jobs, ROOT, DVC, _worker_env(jobs))
    try:
        while True:
            status = sweep.queue_status(ROOT, DVC)
            idle = 0.0 if status[sweep.WORKERS] != "0" else idle or time.time()
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
                    sweep._dvc(["queue", "kill", *(n for _, n in stale)], ROOT, DVC, check=False)
                    sweep._dvc(["queue", "remove", *(n for _, n in stale)], ROOT, DVC, check=False)
                    _queue(stale)
                sweep.start(jobs, ROOT, DVC, _worker_env(jobs))
                idle = 0.0
            done = sweep.experiments(ROOT)
            for n in names:
                now = "Success" if n in done else status.get(n, "Queued")
                if now != seen.get(n) and now in ("Running", "Success", "Failed"):
                    finished = sum(1 for m in names if m in done or status.get(m) == "Failed")
                    left = ""
                    if now != "Running" and finished < len(names):
                        each = (time.time() - t0) / max(finished - len(before & set(names)), 1)
                        left = f"; about {_minutes(each * (len(names) - finished) / jobs)} left"
                    score = ""
                    if now == "Success":
                        got = sweep.read_at(done[n], str(metrics_file("validate")), ROOT)
                        score = f", validation {metric} {json.loads(got)[metric]:.4g}" if got else ""
                    print(
                        f"[sweep] {n}: {now.lower()}{score} ({finished}/{len(names)} arms finished{left})", flush=True
                    )
                seen[n] = now
            if all(seen.get(n) in ("Success", "Failed") for n in names):
                return seen
            time.sleep(5)
    except KeyboardInterrupt:
        # Off the queue first (a worker told to stop still takes the next task), then the
        # running arm stopped (DVC sends it SIGINT). The same command queues them again.
        status = sweep.queue_status(ROOT, DVC)
        queued = [n for n in names if status.get(n) == "Queued"]
        if queued:
            sweep._dvc(["queue", "remove", *queued], ROOT, DVC, check=False)
        running = [n for n in names if status.get(n) == "Running"]
        if running:
            sweep._dvc(["queue", "kill", *running], ROOT, DVC, check=False)
        sweep._dvc(["queue", "stop"], ROOT, DVC, check=False)
        raise


def _arm_results(names: list[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """{name: {"commit", "metrics", "examples"}} of the arms that finished, and
    {name: why} of those that did not."""
    done, ok, failed = sweep.experiments(ROOT), {}, {}
    for n in names:
        if n not in done:
            logs = sweep._dvc(["queue", "logs", n], ROOT, DVC, check=False).strip().splitlines()
            errors = [line for line in logs if "Fix:" in line or "ERROR" in line]
            failed[n] = (errors or logs or ["no log"])[-1][:300]
            continue
        metrics, examples = (sweep.read_at(done[n], str(p), ROOT) for p in (metrics_file("validate"), VAL_EXAMPLES))
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


def summary(names: list[str], arms: list[sweep.Arm], results: dict[str, dict], sel: sweep.Selection, metric: str):
    """The table the parent run holds and the sweep prints: one row per arm."""
    table: dict[str, list] = {"arm": [], "experiment": []}
    for k in arms[0]:
        table[k] = []
    metrics = [m for m in results[names[0]]["metrics"] if isinstance(results[names[0]]["metrics"][m], float)]
    for m in metrics:
        table[f"val_{m}"] = []
    table |= {"delta_vs_winner": [], "ci_low": [], "ci_high": [], "p_value": [], "beaten_holm": []}
    for i, (n, arm) in enumerate(zip(names, arms)):
        c = sel.comparisons[i]
        table["arm"].append("winner" if i == sel.winner else str(i + 1))
        table["experiment"].append(n)
        for k, v in arm.items():
            table[k].append(v)
        for m in metrics:
            table[f"val_{m}"].append(results[n]["metrics"][m])
        # the winner's lead over this arm (winner - arm), with its paired 95% CI
        table["delta_vs_winner"].append(None if c is None else c.delta)
        table["ci_low"].append(None if c is None else c.ci_low)
        table["ci_high"].append(None if c is None else c.ci_high)
        table["p_value"].append(None if c is None else c.p_value)
        table["beaten_holm"].append(None if c is None else sel.beaten[i])
    return table


def metric_figure(arms: list[sweep.Arm], values: list[float], winner: int, metric: str):
    """The validation metric against each swept param (one panel per param; the winner in
    orange); a param spanning a decade or more is drawn on a log axis."""
    from matplotlib.figure import Figure

    keys = list(arms[0])
    fig = Figure(figsize=(3.6 * len(keys), 3.2), layout="constrained")
    for ax, k in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys):
        xs = [a[k] for a in arms]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        pos = xs if numeric else [sorted(set(map(str, xs))).index(str(x)) for x in xs]
        ax.scatter(pos, values, color=["#e8743b" if i == winner else "#2b7bba" for i in range(len(xs))])
        if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(set(map(str, xs)))), sorted(set(map(str, xs))))
        ax.set_xlabel(k)
        ax.set_ylabel(f"validation {metric}")
    return fig


def _record(parent: str, names, arms, arm_params, results, sel, metric: str) -> None:
    """Every arm a child run of the sweep's (one its stages did not open, e.g. an arm DVC
    restored from its run cache, is created here), ranked; the parent gets the table."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()
    exp_id = client.get_run(parent).info.experiment_id
    ts = int(time.time() * 1000)
    for i, (n, p) in enumerate(zip(names, arm_params)):
        # the arm's finished run (an attempt stopped by Ctrl-C is a KILLED run beside it)
        found = client.search_runs(
            [exp_id],
            filter_string=f"tags.`dvc.experiment` = '{n}' and tags.`mlflow.parentRunId` = '{parent}' "
            "and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found:
            run = found[0].info.run_id
        else:
            run = client.create_run(
                exp_id,
                tags={"mlflow.parentRunId": parent, "mlflow.runName": n, "tuneline.kind": "arm", "dvc.experiment": n},
            ).info.run_id
            log_params(client, run, p)
            vals = results[n]["metrics"]
            client.log_batch(
                run, metrics=[Metric(f"val_{k}", v, ts, 0) for k, v in vals.items() if isinstance(v, float)]
            )
            client.set_terminated(run, "FINISHED")
        client.set_tag(run, "tuneline.sweep.role", "winner" if i == sel.winner else "arm")
        client.set_tag(run, "dvc.commit", results[n]["commit"])
    client.log_table(parent, summary(names, arms, results, sel, metric), "sweep_summary.json")
    client.log_figure(parent, metric_figure(arms, sel.values, sel.winner, metric), "metric_vs_params.png")
    client.log_metric(parent, f"winner_val_{metric}", sel.values[sel.winner])
    client.set_tag(parent, "tuneline.sweep.winner", names[sel.winner])


def _winner_through_the_gate(name: str, parent: str) -> dict:
    """`dvc exp apply` the winner (params.yaml, dvc.lock and its model from DVC's cache),
    then the pipeline flow runs what it lacks: evaluate on the test split, and register."""
    sweep._dvc(["exp", "apply", name], ROOT, DVC)
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
    est = _estimate(arm_params)
    print(
        f"[sweep] {len(arms)} arms ({_spec(grid, ranges, sample)}), each trained and scored on the validation "
        "split; "
        + (
            f"about {_minutes(est)} (from this project's last training)"
            if est
            else "no time estimate yet (nothing has trained in this project)"
        )
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
        # the same arms on the same data and code are the same sweep: its DVC experiments
        name = sweep.name(arm_params, _inputs())
        parent = _named(parent, name)
        names = [f"{name}-{i}" for i in range(1, len(arms) + 1)]
        print(f"[sweep] {name}: the arms are the DVC experiments {names[0]} to {names[-1]}")
        queued = _queue_missing(arms, names, parent)
        if queued or any(s in ("Queued", "Running") for n, s in sweep.queue_status(ROOT, DVC).items() if n in names):
            run_arms(names, arms, jobs, params.primary_metric())
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
        _record(parent, names_ok, arms_ok, params_ok, results, sel, metric)
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
        client.set_terminated(parent, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
