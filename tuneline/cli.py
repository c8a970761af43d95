"""`tuneline` command line: run the pipeline, open the UIs, predict, check the setup."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import typer
from rich.console import Console

from tuneline import ROOT, servers
from tuneline.data import METRICS, PREDICTIONS
from tuneline.errors import TunelineError, print_error

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Reproducible fine-tuning of GPT-2-family models: prepare → tokenize → train → evaluate → register.",
    epilog="Start with `tuneline run` (the default job), then `tuneline ui` to look at it. "
    "`tuneline COMMAND --help` explains each command; README.md has the rest.",
)
out = Console(soft_wrap=True)
_state = {"debug": False}


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors (here and in the stages)."),
) -> None:
    _state["debug"] = debug
    if debug:
        os.environ["TUNELINE_DEBUG"] = "1"  # the stage processes DVC starts inherit it


def _fail(e: Exception) -> None:
    if _state["debug"]:
        raise e
    print_error(str(e))
    raise typer.Exit(2)


@app.command()
def run(
    recipe: str = typer.Option(
        None,
        "--recipe",
        "-r",
        metavar="NAME",
        help="A recipe from recipes/ (see `tuneline recipes`); "
        "it is written to params.yaml. Default: params.yaml as it is.",
    ),
    sets: list[str] = typer.Option(
        [], "--set", "-s", metavar="KEY=VALUE", help="Override one param, e.g. --set train.lr=0.001 (repeatable)."
    ),
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
            # Validate before anything starts (the flow checks again: it can be run alone).
            params = _params(recipe, sets, smoke)
            preflight.check(params, store=False, model=False)  # a wrong path fails before a model is built
            _build_apart(params.model.name)
            preflight.check(params)
            api = os.environ.get("PREFECT_API_URL")
            if not api:  # Ctrl-C must not kill the temporary server with the stage
                servers.detach_temporary_prefect_server()
            elif not servers.answers(f"{api.rstrip('/')}/health", timeout=5):  # Prefect would retry it for minutes
                raise TunelineError(
                    f"the Prefect server at PREFECT_API_URL={api} does not answer",
                    "start it (`tuneline ui`), or unset PREFECT_API_URL to use a temporary one",
                )
            from flows.pipeline import pipeline
            from tuneline.secrets import redact
            from tuneline.tracking import tracking_uri

            t = time.time()
            state = pipeline(recipe=recipe, overrides=list(sets), smoke=smoke, return_state=True)
    except TunelineError as e:
        _fail(e)
        return
    except KeyboardInterrupt:  # typer would exit 130 without a word
        print_error("interrupted. Fix: re-run the same command; finished stages and checkpoints are reused")
        raise typer.Exit(130) from None
    if not state.is_completed():  # the flow's message is the one line naming the problem and the fix
        if state.is_crashed() and "interrupt" in (state.message or ""):  # Ctrl-C between two stages
            print_error("interrupted. Fix: re-run the same command; finished stages and checkpoints are reused")
            raise typer.Exit(130)
        failed = state.result(raise_on_failure=False)
        if isinstance(failed, BaseException) and not isinstance(failed, TunelineError):
            raise failed  # unforeseen: main() prints one line and saves the traceback
        print_error(str(failed) if isinstance(failed, TunelineError) else state.message or "the pipeline failed")
        raise typer.Exit(failed.get("exit_code", 2) if isinstance(failed, dict) else 2)
    status = state.result()
    if set(status.values()) == {"skipped"}:
        out.print(
            f"[bold green]skipped: nothing changed[/] ({time.time() - t:.0f}s): data, params and code match "
            "dvc.lock, so no stage ran; `dvc status` agrees"
        )
        return
    where = ROOT / ".smoke" / (recipe or "params") if smoke else ROOT
    rel = os.path.relpath(where)
    out.print(
        f"\n[bold green]{'smoke run' if smoke else 'pipeline'} finished[/] in {time.time() - t:.0f}s: "
        + ", ".join(f"{k} {v}" for k, v in status.items())
    )
    out.print(
        f"  metrics:     {os.path.join(rel, METRICS['evaluate'])} (base vs tuned, test split), "
        f"{os.path.join(rel, METRICS['validate'])} (tuned, validation split), "
        f"{os.path.join(rel, METRICS['tokenize'])} (packing)"
    )
    out.print(f"  predictions: {os.path.join(rel, PREDICTIONS)}")
    out.print(
        f"  MLflow:      {redact(tracking_uri())} (experiment '{'smoke' if smoke else _experiment()}'); browse with `tuneline ui`"
    )
    if not smoke:
        out.print('  try it:      tuneline predict "<input>" (the champion of register.model_name)')


@app.command()
def sweep(
    recipe: str = typer.Option(
        None, "--recipe", "-r", metavar="NAME", help="Recipe the arms start from (default: params.yaml)."
    ),
    sets: list[str] = typer.Option(
        [], "--set", "-s", metavar="KEY=VALUE", help="Override one param for every arm (repeatable)."
    ),
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
        _fail(e)
        return
    except KeyboardInterrupt:
        from flows.sweep import INTERRUPTED

        print_error(INTERRUPTED)
        raise typer.Exit(130) from None
    if not state.is_completed():
        failed = state.result(raise_on_failure=False)
        if isinstance(failed, BaseException) and not isinstance(failed, TunelineError):
            raise failed
        print_error(str(failed) if isinstance(failed, TunelineError) else state.message or "the sweep failed")
        raise typer.Exit(failed.get("exit_code", 2) if isinstance(failed, dict) else 2)
    res = state.result()
    if dry_run:
        return
    out.print(
        f"\n[bold green]sweep {res['sweep']} finished[/] in {res['total_s'] / 60:.1f} min: winner {res['winner']}, "
        f"test {res['test']:.4g}, gate: {res.get('gate') or 'not registered (register.dry_run)'}"
    )
    out.print("  arms:   `dvc exp show` (params and validation metrics); `tuneline ui` (the sweep's MLflow run)")


def _build_apart(name: str) -> None:
    """Convert a built-in model into the cache (once) in a child process: the preflight
    reads its config, and this process stays small for the hours it waits on the stages
    (their peak RSS, which starts from ours when they fork, stays their own)."""
    import subprocess

    from tuneline.modeling import BUILTIN, SCRATCH, cache_dir

    if name not in BUILTIN or name in SCRATCH or (cache_dir() / name / "config.json").is_file():
        return
    code = f"from tuneline.modeling import resolve; resolve({name!r})"
    if subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode != 0:
        raise TunelineError(f"could not build the built-in model '{name}'", "see the lines above; `tuneline doctor`")


def _experiment() -> str:
    from tuneline.config import load_params

    try:
        return load_params(ROOT / "params.yaml").register.experiment
    except TunelineError:
        return "?"


@app.command("recipes")
def list_recipes() -> None:
    """List the shipped recipes (recipes/*.yaml) and what each one does."""
    from tuneline import recipes

    for name in recipes.names():
        first = (recipes.recipes_dir() / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        out.print(f"[bold]{name:<11}[/] {first}")


@app.command()
def predict(
    text: str = typer.Argument(..., help="The input, e.g. scrambled words for the descrambler."),
    model: str = typer.Option(None, help="Model URI (default: models:/<register.model_name>@champion)."),
    free: bool = typer.Option(
        False, "--free", help="Decode freely (else a descrambler keeps the input's words, as evaluate scored it)."
    ),
) -> None:
    """Answer with the champion model from the MLflow registry."""
    try:
        from tuneline import predict as pred
        from tuneline import registry

        if not text.strip():
            raise TunelineError(
                "the input is empty, so there is nothing to answer",
                'give the text, e.g. tuneline predict "sat the cat mat. on the"',
            )
        client = _client()
        uri = model
        if uri is None:
            name = _model_name(None)
            registry.require_model(client, name)
            if registry.champion(client, name) is None:
                raise TunelineError(
                    f"model '{name}' has no champion yet", "promote a version: tuneline promote VERSION --reason ..."
                )
            uri = f"models:/{name}@champion"
        out.print(pred.answer(pred.load(uri), text, free))
    except TunelineError as e:
        _fail(e)


def _params(recipe: str | None, sets: list[str], smoke: bool = False):
    """The recipe's params (params.yaml's without one) with the --set overrides, validated."""
    from tuneline import recipes
    from tuneline.config import load_params

    return recipes.build(recipe, list(sets), smoke, None if recipe else load_params(ROOT / "params.yaml").model_dump())


def _model_name(name: str | None) -> str:
    from tuneline import require_project
    from tuneline.config import load_params

    return name or load_params(require_project() / "params.yaml").register.model_name


@app.command()
def evaluate(
    model: str = typer.Option(
        ...,
        "--model",
        "-m",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, "
        "a local model folder, or a built-in/hub model name.",
    ),
    data: str = typer.Option(
        ...,
        "--data",
        "-d",
        help="A CSV/JSON/JSONL/Parquet file (or any prepare.source form) with the recipe's columns.",
    ),
    recipe: str = typer.Option(
        None,
        "--recipe",
        "-r",
        metavar="NAME",
        help="The recipe whose task, template and labels apply (default: params.yaml).",
    ),
    sets: list[str] = typer.Option(
        [], "--set", "-s", metavar="KEY=VALUE", help="Override one param, e.g. --set evaluate.num_beams=4."
    ),
    limit: int = typer.Option(0, help="Evaluate only the first N examples (0: all)."),
    output: Path = typer.Option(
        None, "--out", "-o", help="Where the JSON goes (default: reports/evaluate/<model>-<data>.json)."
    ),
) -> None:
    """Evaluate any model on any file with a recipe's columns.

    Prints the metrics, saves them as JSON and logs them to MLflow."""
    try:
        import json
        import re

        from tuneline.evaluation import evaluate_file
        from tuneline.io import write_json
        from tuneline.secrets import redact
        from tuneline.tracking import log_params, setup

        if limit < 0:
            raise TunelineError(f"--limit {limit} is negative", "give 0 (every example) or how many to evaluate")
        if output is not None and output.is_dir():
            raise TunelineError(
                f"--out '{output}' is a folder; the evaluation is saved as one JSON file",
                f"give a file path, e.g. --out {output / 'evaluation.json'}",
            )
        from tuneline import require_project

        require_project()
        params = _params(recipe, sets)
        result = evaluate_file(model, params, data, limit)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model}-{Path(data).stem}").strip("_")
        path = output or ROOT / "reports" / "evaluate" / f"{slug}.json"
        write_json(path, result)
        import mlflow

        setup(params.register.experiment)
        with mlflow.start_run(
            run_name=f"evaluate {model} on {Path(data).name}",
            tags={"tuneline.kind": "evaluation", "tuneline.model": redact(model), "tuneline.data": redact(data)},
        ) as run:
            log_params(mlflow.MlflowClient(), run.info.run_id, params)
            mlflow.log_metrics({k: float(v) for k, v in result["metrics"].items()})
            mlflow.log_text(json.dumps(result, indent=2), "evaluation.json")
    except TunelineError as e:
        _fail(e)
        return
    out.print(f"[bold]{model}[/] on {result['n_examples']} examples of {data} ({result['task']}):")
    for k, v in result["metrics"].items():
        star = " (primary)" if k == result["primary_metric"] else ""
        out.print(f"  {k:<18} {v:.4g}{star}")
    out.print(
        f"  saved: {os.path.relpath(path)}; MLflow run {run.info.run_id} in experiment '{params.register.experiment}'"
    )


@app.command()
def promote(
    version: str = typer.Argument(..., help="The version to make champion."),
    reason: str = typer.Option(..., "--reason", help="Why (kept in the alias history)."),
    name: str = typer.Option(None, "--name", help="Registered model (default: register.model_name)."),
) -> None:
    """Move the `champion` alias to VERSION by hand; who, when and why are recorded."""
    from tuneline import registry

    _move(lambda client, n: registry.promote(client, n, version, reason.strip()), name, reason)


@app.command()
def rollback(
    reason: str = typer.Option(..., "--reason", help="Why (kept in the alias history)."),
    name: str = typer.Option(None, "--name", help="Registered model (default: register.model_name)."),
) -> None:
    """Move `champion` back to the version that was champion before the current one."""
    from tuneline import registry

    _move(lambda client, n: registry.rollback(client, n, reason.strip()), name, reason)


def _client():
    """An MLflow client on the checked store. The default store is the project's mlflow.db,
    so without MLFLOW_TRACKING_URI the command must run inside the project."""
    import mlflow

    from tuneline import require_project
    from tuneline.tracking import check_store, tracking_uri

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        require_project()
    check_store()
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def _move(fn, name: str | None, reason: str) -> None:
    from tuneline import registry

    try:
        registry.check_reason(reason)
        client = _client()
        name = _model_name(name)
        registry.require_model(client, name)
        event = fn(client, name)
    except TunelineError as e:
        _fail(e)
        return
    before = f"v{event['previous']}" if event["previous"] else "none"
    out.print(
        f"{name}: champion {before} -> v{event['version']} ({event['action']} by {event['who']} "
        f"at {event['when']}: {event['why']})"
    )


@app.command()
def history(name: str = typer.Option(None, "--name", help="Registered model (default: register.model_name).")) -> None:
    """Every move of the `champion` alias, and every gate decision that kept it: when, who,
    what and why."""
    try:
        from tuneline import registry

        client = _client()
        name = _model_name(name)
        registry.require_model(client, name)
        events = registry.history(client, name) + registry.kept_decisions(client, name)
    except TunelineError as e:
        _fail(e)
        return
    if not events:
        out.print(f"{name}: the champion alias has never moved")
    for e in sorted(events, key=lambda e: e["when"]):
        if "decision" in e:  # a gate decision that moved nothing
            what = f"v{e['version']} not promoted ({e['decision']})"
        else:
            what = f"{'v' + str(e['previous']) if e['previous'] else 'none'} -> v{e['version']}"
        out.print(f"{e['when']}  {e['action']:<8} {what}  by {e['who']}: {e['why']}")


@app.command()
def diff(
    a: str = typer.Argument("champion", help="What B is compared with: a version (3 or v3), an alias, or runs:/ID."),
    b: str = typer.Argument("challenger", help="The model reviewed, in the same forms."),
    name: str = typer.Option(None, "--name", help="Registered model (default: register.model_name)."),
    threshold: float = typer.Option(
        None,
        help="The smallest change on one example that counts as fixed or broken (default: a flip for 0/1 "
        "metrics, 10 points for chrF/BLEU, 1 for perplexity).",
    ),
    show: int = typer.Option(5, min=0, help="Examples shown of each list."),
    save: Path = typer.Option(None, "--out", help="Also write the report (Markdown) to this file."),
) -> None:
    """What B fixed and broke against A (the challenger against the champion), by slice, and what changed."""
    try:
        from tuneline import registry, review
        from tuneline.io import write_text

        if save is not None and save.is_dir():
            raise TunelineError(f"--out '{save}' is a folder", f"give a file path, e.g. --out {save / 'review.md'}")
        client = _client()
        name = _model_name(name)
        registry.require_model(client, name)
        text = review.report(review.side(client, name, a), review.side(client, name, b), threshold, show)
        if save is not None:
            write_text(save, text)
    except TunelineError as e:
        _fail(e)
        return
    out.print(text, markup=False, highlight=False)


@app.command()
def schedule(
    cron: str = typer.Option(
        ..., "--cron", metavar="CRON", help='When to run, as a cron expression in UTC, e.g. "0 3 * * *" (03:00 daily).'
    ),
    recipe: str = typer.Option(
        None, "--recipe", "-r", metavar="NAME", help="Recipe to run (default: params.yaml as it is at each run)."
    ),
    sets: list[str] = typer.Option(
        [], "--set", "-s", metavar="KEY=VALUE", help="Override one param, e.g. --set train.lr=0.001 (repeatable)."
    ),
    name: str = typer.Option(None, "--name", help="Deployment name (default: the recipe's, or 'params')."),
    grid: list[str] = typer.Option([], "--grid", metavar="KEY=V1,V2", help="Schedule a sweep (see `tuneline sweep`)."),
    sample: int = typer.Option(0, "--sample", metavar="N", help="A sampled sweep's arm count (with --range)."),
    ranges: list[str] = typer.Option([], "--range", metavar="KEY=LOW:HIGH", help="A sampled sweep's ranges."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="A sweep's arms trained side by side, one per GPU."),
) -> None:
    """Run the pipeline (or, with --grid/--sample, a sweep) on a cron schedule until Ctrl-C.

    Runs whose data and params are unchanged end at once as "skipped: nothing changed".
    Uses the Prefect server of `tuneline ui` (or PREFECT_API_URL), and starts one on
    127.0.0.1:4200 if none is up. `prefect.yaml` deploys the same flow to a work pool."""
    from flows.schedule import schedule as schedule_flow
    from tuneline import require_project

    spec = {"grid": list(grid), "ranges": list(ranges), "sample": sample, "jobs": jobs}
    try:
        require_project()
        schedule_flow(cron, recipe, list(sets), name, say=out.print, sweep=spec if grid or ranges or sample else None)
    except TunelineError as e:
        _fail(e)


@app.command()
def ui(
    mlflow_port: int = typer.Option(
        5000,
        "--mlflow-port",
        help="Port of the MLflow UI (runs, metrics, plots, predictions tables, registered models).",
    ),
    prefect_port: int = typer.Option(4200, "--prefect-port", help="Port of the Prefect UI (flow runs, tasks, logs)."),
    host: str = typer.Option(
        "127.0.0.1",
        help="Address both servers listen on. The default is reachable from "
        "this machine only; 0.0.0.0 opens them to the network.",
    ),
) -> None:
    """Start the MLflow and Prefect UIs on 127.0.0.1 and print their URLs; Ctrl-C stops both.

    It waits until both servers answer.

    MLflow serves MLFLOW_TRACKING_URI's store (default mlflow.db; postgres works).
    Prefect serves the flow runs in .prefect/. Server logs go to .cache/ui/.
    """
    from tuneline.secrets import redact
    from tuneline.tracking import check_store, tracking_uri

    store = tracking_uri()
    try:
        from tuneline import require_project

        require_project()  # it serves the project's store and flow runs: never a new empty one elsewhere
        servers.check_ports(
            host, {"MLflow": ("--mlflow-port", mlflow_port), "Prefect": ("--prefect-port", prefect_port)}
        )
        check_store(store, to_serve=True)
    except TunelineError as e:
        _fail(e)
        return
    out.print(
        f"starting MLflow (store {redact(store)}) and Prefect (flow runs in {os.environ['PREFECT_HOME']}); "
        f"server logs in {os.path.relpath(servers.logs_dir())}/",
        markup=False,
        highlight=False,
    )

    def ready(seconds: float) -> None:
        out.print(
            f"ready in {seconds:.1f}s: MLflow {servers.url(host, mlflow_port)}  Prefect "
            f"{servers.url(host, prefect_port)}  (Ctrl-C stops both)",
            markup=False,
            highlight=False,
        )
        sys.stdout.flush()

    try:
        took = servers.serve_until_stopped(
            [lambda: servers.mlflow(host, mlflow_port, store), lambda: servers.prefect(host, prefect_port)], host, ready
        )
    except TunelineError as e:
        _fail(e)
        return
    out.print(f"stopped MLflow and Prefect in {took:.1f}s", highlight=False)


@app.command("dvc-deps")
def dvc_deps(write: bool = typer.Option(False, "--write", help="Rewrite dvc.yaml (else only check it).")) -> None:
    """Check (or --write) dvc.yaml's deps, params and outputs against the code.

    Each stage depends on the project files its code imports and on the data and params
    its component declares; `make deps` writes them after a code change."""
    from tuneline import deps

    path = ROOT / "dvc.yaml"
    if write:
        text = deps.render(path)
        changed = text != path.read_text()
        if changed:
            from tuneline.io import write_text

            write_text(path, text)
        out.print(
            f"dvc.yaml: {'deps, params and outputs rewritten from the code' if changed else 'already matches the code'}"
        )
        return
    stale = deps.stale(path)
    if stale:
        print_error(
            f"dvc.yaml disagrees with the code for: {', '.join(stale)}. Fix: run `tuneline dvc-deps --write` "
            "(make deps) and commit dvc.yaml"
        )
        raise typer.Exit(1)
    out.print("dvc.yaml: deps, params and outputs match the code")


@app.command()
def doctor() -> None:
    """Offline preflight: which assets are local, and what would need the network."""
    from tuneline.doctor import preflight

    raise typer.Exit(0 if preflight(out.print) else 1)


def main() -> None:
    """The `tuneline` command: errors are one line (red on a terminal); tracebacks only with --debug."""
    from tuneline.errors import debug, report

    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C outside a stage (a stage reports its own and exits 130)
        print_error("interrupted. Fix: re-run the same command; finished stages and checkpoints are reused")
        sys.exit(130)
    except Exception as e:  # not a TunelineError: those exit through _fail
        if _state["debug"] or debug():
            raise
        print_error(report(e, "tuneline"))
        sys.exit(1)


if __name__ == "__main__":
    main()
