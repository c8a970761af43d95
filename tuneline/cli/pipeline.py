"""Commands that run work: `run` (the pipeline flow), `sweep` (many arms as DVC experiments)
and `recipes` (what `--recipe` accepts)."""

from __future__ import annotations

import os
import sys
import time

import typer

from tuneline import ROOT, gitcheck, servers
from tuneline.cli.app import app, fail, out, params_of, recipe_opt, sets_opt, typed_here
from tuneline.data import METRICS, PREDICTIONS
from tuneline.errors import INTERRUPTED, TunelineError, print_error


@app.command()
def run(
    recipe: str = recipe_opt(
        "A recipe from recipes/ (see `tuneline recipes`); it is written to params.yaml. Default: params.yaml as it is."
    ),
    sets: list[str] = sets_opt(),
    smoke: bool = typer.Option(
        False,
        "--smoke",
        help="A tiny slice of the recipe, in .smoke/, logged to the MLflow "
        "experiment 'smoke'; touches no alias, params.yaml or pipeline output.",
    ),
) -> None:
    """Run the pipeline (a Prefect flow); stages whose inputs are unchanged are skipped."""
    try:
        from tuneline import preflight, require_project
        from tuneline.lock import project_lock

        with project_lock(require_project()):
            sets = typed_here(sets)
            # Validate before anything starts (the flow checks again: it can be run alone).
            params = params_of(recipe, sets, smoke)
            preflight.check(params, store=False, model=False)  # a wrong path fails before a model is built
            if not smoke:  # before Prefect's server starts (~10 s), not from inside the flow
                gitcheck.check_untracked_state(ROOT)
            api = os.environ.get("PREFECT_API_URL")
            if not api:  # Ctrl-C must not kill the temporary server with the stage
                servers.detach_temporary_prefect_server()
            _build_apart(params.model.name, start_server=not api)
            preflight.check(params)
            # a named server that does not answer: Prefect would retry it for minutes
            if api and not servers.answers(f"{api.rstrip('/')}/health", timeout=5):
                raise TunelineError(
                    f"the Prefect server at PREFECT_API_URL={api} does not answer",
                    "start it (`tuneline ui`), or unset PREFECT_API_URL to use a temporary one",
                )
            from flows.pipeline import pipeline
            from tuneline.secrets import redact
            from tuneline.store import tracking_uri

            t = time.time()
            state = pipeline(recipe=recipe, overrides=list(sets), smoke=smoke, return_state=True)
    except TunelineError as e:
        fail(e)
        return
    except KeyboardInterrupt:  # typer would exit 130 without a word
        print_error(INTERRUPTED)
        raise typer.Exit(130) from None
    if state.is_crashed() and "interrupt" in (state.message or ""):  # Ctrl-C between two stages
        print_error(INTERRUPTED)
        raise typer.Exit(130)
    _exit_unless_completed(state, "the pipeline failed")
    status = state.result()
    if set(status.values()) == {"skipped"}:
        out.print(
            f"[bold green]skipped: nothing changed[/] ({time.time() - t:.0f}s): data, params and code match "
            "dvc.lock, so no stage ran; `dvc status` agrees"
        )
        return
    where = ROOT / ".smoke" / (recipe or "params") if smoke else ROOT

    def shown(path) -> str:  # 'metrics/eval.json' (not './metrics/eval.json'), or '.smoke/…/metrics/eval.json'
        return os.path.normpath(os.path.join(os.path.relpath(where), path))

    out.print(
        f"\n[bold green]{'smoke run' if smoke else 'pipeline'} finished[/] in {time.time() - t:.0f}s: "
        + ", ".join(f"{k} {v}" for k, v in status.items())
    )
    out.print(
        f"  metrics:     {shown(METRICS['evaluate'])} (base vs tuned, test split), "
        f"{shown(METRICS['validate'])} (tuned, validation split), "
        f"{shown(METRICS['tokenize'])} (packing)"
    )
    out.print(f"  predictions: {shown(PREDICTIONS)}")
    out.print(
        f"  MLflow:      {redact(tracking_uri())} (experiment '{'smoke' if smoke else _experiment()}'); browse with `tuneline ui`"
    )
    if hint := try_it(params, where):
        out.print(f"  try it:      {hint}", markup=False, highlight=False)


def try_it(params, root) -> str | None:
    """The command that answers with the version this run registered (metrics/register.json),
    on the task's example input: the champion's alias when the gate promoted it, else the
    version itself, with why it is not champion; a smoke run's model as it logged it (a dry
    run registers nothing). None when nothing was logged."""
    import shlex

    from tuneline import tasks
    from tuneline.data import metrics_file
    from tuneline.io import read_json

    path = root / metrics_file("register")
    result = read_json(path) if path.is_file() else {}
    version, name = result.get("version"), params.register.model_name
    example = shlex.quote(tasks.TASKS[params.prepare.task].serve_example)
    if result.get("dry_run") and result.get("model_uri"):
        return f"tuneline predict --model {result['model_uri']} {example}   (this smoke run's model: logged, not registered)"
    if not version:
        return None
    if result.get("promoted"):
        return f"tuneline predict {example}   ({name} v{version}, the champion)"
    if result.get("same_as_champion"):
        return f"tuneline predict {example}   ({name} v{version}, the champion, which this run trained again)"
    if result.get("same_as_version"):
        return (
            f"tuneline predict --model models:/{name}/{version} {example}   (v{version}, which this run trained again; "
            "the gate kept it out before: `tuneline history` says why)"
        )
    why = "the gate did not promote it; `tuneline history` says why"
    if result.get("gate", {}).get("decision") == "kept champion":  # a champion to compare with
        why += ", and `tuneline diff` shows what it changed"
    return f"tuneline predict --model models:/{name}/{version} {example}   (v{version} is not the champion: {why})"


@app.command()
def sweep(
    recipe: str = recipe_opt("Recipe the arms start from (default: params.yaml)."),
    sets: list[str] = sets_opt("Override one param for every arm (repeatable)."),
    grid: list[str] = typer.Option(
        [],
        "--grid",
        "-g",
        metavar="KEY=V1,V2",
        help="One axis of a grid, e.g. --grid train.lr=1e-4,5e-4 (repeatable: the product).",
    ),
    sample: int = typer.Option(0, "--sample", metavar="N", help="N seeded random arms over the --range values."),
    ranges: list[str] = typer.Option(
        [],
        "--range",
        metavar="KEY=LOW:HIGH",
        help="A range to sample (log-uniform over decades), or KEY=A,B,C to choose from.",
    ),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Arms trained side by side, one per GPU."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate every arm and print the plan; run nothing."),
) -> None:
    """Try many configurations as DVC experiments; only the best on validation faces the gate.

    Each arm trains and is scored on the validation split (`dvc exp show` lists them); the
    winner is compared with the other arms by paired bootstrap (Holm over the arms), then
    evaluated on the test split and sent through the gate. The same command again skips
    the arms already run."""
    try:
        from tuneline import require_project
        from tuneline.lock import project_lock

        with project_lock(require_project()):
            from flows.sweep import plan, sweep_flow

            sets = typed_here(sets)
            plan.fn(recipe, list(sets), list(grid), list(ranges), sample, jobs)  # a bad spec fails in seconds
            if not os.environ.get("PREFECT_API_URL"):  # Ctrl-C must not kill the temporary server with an arm
                servers.detach_temporary_prefect_server()

            state = sweep_flow(
                recipe=recipe,
                overrides=list(sets),
                grid=list(grid),
                ranges=list(ranges),
                sample=sample,
                jobs=jobs,
                dry_run=dry_run,
                return_state=True,
            )
    except TunelineError as e:
        fail(e)
        return
    except KeyboardInterrupt:
        from flows.sweep import INTERRUPTED

        print_error(INTERRUPTED)
        raise typer.Exit(130) from None
    _exit_unless_completed(state, "the sweep failed")
    res = state.result()
    if dry_run:
        return
    out.print(
        f"\n[bold green]sweep {res['sweep']} finished[/] in {res['total_s'] / 60:.1f} min: winner {res['winner']}, "
        f"test {res['metric']} {res['test']:.4g}, gate: {res.get('gate') or 'not registered (register.dry_run)'}"
    )
    out.print("  arms:   `dvc exp show` (params and validation metrics); `tuneline ui` (the sweep's MLflow run)")
    from tuneline.params_file import load_params

    if hint := try_it(load_params(ROOT / "params.yaml"), ROOT):  # the winner's, applied to the workspace
        out.print(f"  try it: {hint}", markup=False, highlight=False)


def _exit_unless_completed(state, otherwise: str) -> None:
    """A flow that did not complete exits with its one line (the TunelineError naming the
    problem and the fix, or the state's message) and its exit code; an unforeseen exception is
    raised, so that main() prints one line and saves the traceback."""
    if state.is_completed():
        return
    failed = state.result(raise_on_failure=False)
    if isinstance(failed, BaseException) and not isinstance(failed, TunelineError):
        raise failed
    print_error(str(failed) if isinstance(failed, TunelineError) else state.message or otherwise)
    raise typer.Exit(failed.get("exit_code", 2) if isinstance(failed, dict) else 2)


def _build_apart(name: str, start_server: bool = False) -> None:
    """Convert a built-in model into the cache (once) in a child process: the preflight
    reads its config, and this process stays small for the hours it waits on the stages
    (their peak RSS, which starts from ours when they fork, stays their own).
    `start_server`: while the child converts (~20 s, one core), start Prefect's temporary
    server (~14 s, the other core), which the flow would otherwise start after it."""
    import subprocess

    from tuneline.modeling import BUILTIN, SCRATCH, cache_dir

    if name not in BUILTIN or name in SCRATCH or (cache_dir() / name / "config.json").is_file():
        return
    child = subprocess.Popen(
        [sys.executable, "-c", f"from tuneline.modeling import resolve; resolve({name!r})"], cwd=ROOT
    )
    try:
        if start_server:
            servers.start_temporary_prefect_server()
        code = child.wait()
    except BaseException:  # Ctrl-C, or the server did not start: the half-built model is a temporary folder
        child.kill()
        child.wait()
        raise
    if code != 0:
        raise TunelineError(f"could not build the built-in model '{name}'", "see the lines above; `tuneline doctor`")


def _experiment() -> str:
    from tuneline.params_file import load_params

    try:
        return load_params(ROOT / "params.yaml").register.experiment
    except TunelineError:
        return "?"


@app.command("recipes")
def list_recipes() -> None:
    """List the shipped recipes (recipes/*.yaml) and what each one does."""
    from rich.table import Table

    from tuneline import recipes

    table = Table(box=None, show_header=False, padding=(0, 1, 0, 0))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for name in recipes.names():
        table.add_row(name, recipes.summary(name))
    out.print(table)
