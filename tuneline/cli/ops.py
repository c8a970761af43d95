"""Commands that keep a project running: `schedule` (cron runs), `ui` (the MLflow and Prefect
servers), `dvc-deps` (dvc.yaml against the code) and `doctor` (the offline preflight)."""

from __future__ import annotations

import os
import sys

import typer

from tuneline import ROOT, servers
from tuneline.cli.app import app, fail, out, recipe_opt, sets_opt, typed_here
from tuneline.errors import TunelineError, print_error


@app.command()
def schedule(
    cron: str = typer.Option(
        ..., "--cron", metavar="CRON", help='When to run, as a cron expression in UTC, e.g. "0 3 * * *" (03:00 daily).'
    ),
    recipe: str = recipe_opt("Recipe to run (default: params.yaml as it is at each run)."),
    sets: list[str] = sets_opt(),
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
        schedule_flow(
            cron, recipe, typed_here(sets), name, say=out.print, sweep=spec if grid or ranges or sample else None
        )
    except TunelineError as e:
        fail(e)


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
    from tuneline.store import check_store, tracking_uri

    store = tracking_uri()
    try:
        from tuneline import require_project

        require_project()  # it serves the project's store and flow runs: never a new empty one elsewhere
        servers.check_ports(
            host, {"MLflow": ("--mlflow-port", mlflow_port), "Prefect": ("--prefect-port", prefect_port)}
        )
        check_store(store, to_serve=True)
    except TunelineError as e:
        fail(e)
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
        fail(e)
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
