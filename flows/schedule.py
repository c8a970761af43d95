"""Serve the pipeline flow, or a sweep (`--grid`/`--sample`), on a cron schedule from this
process (`tuneline schedule`).

Prefect's scheduler lives in its server, so serving needs one: PREFECT_API_URL if set,
else the local one `tuneline ui` starts (127.0.0.1:4200), else this process starts it and
stops it on exit. Scheduled runs execute here, one at a time (`limit=1`); training also
takes the machine-wide lock (tuneline/lock.py), whatever started it. For workers on other
machines, `prefect.yaml` deploys the same flow to a process work pool.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from tuneline import recipes, servers, serving
from tuneline.errors import TunelineError

LOCAL_API = "http://127.0.0.1:4200/api"


def check_cron(cron: str) -> str:
    """The cron expression as Prefect will serve it, or one line that says what is wrong
    with it: too few fields, a field out of its range, or a date that never comes (day 30
    of February), which Prefect would accept and never run. Six or seven fields are refused
    too: croniter would read the sixth as seconds *after* the day-of-week, where Quartz and
    Spring put seconds first ("0 0 3 * * *", 03:00 there, is every second of a minute on
    the 3rd here). Returns the next run, in UTC."""
    from datetime import UTC, datetime

    from prefect._vendor.croniter import CroniterBadDateError, croniter  # what Prefect's scheduler runs
    from prefect.client.schemas.schedules import CronSchedule

    fields = 'give five fields: minute hour day-of-month month day-of-week, e.g. "0 3 * * *" (03:00 daily)'
    n = len(cron.split())
    if n in (6, 7):
        raise TunelineError(f"--cron '{cron}' has {n} fields, and a sixth would be read as seconds", fields)
    try:
        CronSchedule(cron=cron)
    except ValueError:
        if n == 5:
            raise TunelineError(
                f"--cron '{cron}' is not a cron expression: a field is out of its range",
                "minute 0-59, hour 0-23, day-of-month 1-31, month 1-12 (or jan-dec), day-of-week 0-6 "
                '(or sun-sat), each a number, a range (1-5), a list (1,15) or a step (*/10), e.g. "0 3 * * *"',
            ) from None
        raise TunelineError(f"--cron '{cron}' is not a cron expression", fields) from None
    try:
        next_run = croniter(cron, datetime.now(UTC)).get_next(datetime)
    except CroniterBadDateError:
        raise TunelineError(
            f"--cron '{cron}' never runs: no date matches its day-of-month and month",
            "choose a day that month has (February has 28 or 29 days; April, June, September and November 30)",
        ) from None
    return next_run.strftime("%Y-%m-%d %H:%M UTC")


def check_name(name: str | None) -> None:
    from prefect.types.names import BANNED_CHARACTERS

    if name and (bad := [c for c in BANNED_CHARACTERS if c in name]):
        raise TunelineError(
            f"--name {name!r} holds {' and '.join(map(repr, bad))}, which Prefect refuses in a deployment's name",
            "choose a name without / % & < >, e.g. nightly-emotion",
        )


def schedule(
    cron: str,
    recipe: str | None = None,
    overrides: list[str] | None = None,
    name: str | None = None,
    say: Callable[[str], None] = print,
    sweep: dict | None = None,
) -> None:
    """Validate everything, find (or start) the Prefect server, then serve until Ctrl-C.
    `sweep`: {"grid", "ranges", "sample", "jobs"} serves `tuneline sweep` instead of a run."""
    overrides = list(overrides or [])
    next_run = check_cron(cron)
    check_name(name)
    params = recipes.build(recipe, overrides, False, None if recipe else _params_yaml())  # fail before serving
    serving.check_champion_task(params)  # refused now, not in every scheduled run (each run checks again)
    if sweep:
        from flows.sweep import plan

        plan.fn(recipe, overrides, sweep["grid"], sweep["ranges"], sweep["sample"], sweep["jobs"])
    server = None
    api = os.environ.get("PREFECT_API_URL")
    if api:
        if not servers.answers(f"{api.rstrip('/')}/health"):
            raise TunelineError(
                f"the Prefect server at PREFECT_API_URL={api} does not answer",
                "start it (`tuneline ui` or `prefect server start`), or unset PREFECT_API_URL",
            )
    elif servers.answers(f"{LOCAL_API}/health"):
        api = LOCAL_API
    else:
        say(f"no Prefect server is up: starting one on {LOCAL_API.removesuffix('/api')} (it stops with this command)")
        server, api = servers.prefect_ready("127.0.0.1", 4200), LOCAL_API
    os.environ["PREFECT_API_URL"] = api  # this process and the flow runs it starts
    from flows.pipeline import pipeline
    from flows.sweep import sweep_flow

    deployment = name or (recipe or "params")
    served, parameters, what = pipeline, {"recipe": recipe, "overrides": overrides}, "pipeline"
    if sweep:
        served, what = sweep_flow, "sweep"
        parameters |= {k: sweep[k] for k in ("grid", "ranges", "sample", "jobs")}
    say(f"serving '{served.name}/{deployment}' on '{cron}' (UTC, next run {next_run}) via {api}; Ctrl-C stops")
    say(f"  run it now: prefect deployment run '{served.name}/{deployment}'")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):  # prefect read its settings at import
            served.serve(
                name=deployment,
                cron=cron,
                parameters=parameters,
                limit=1,
                tags=["tuneline"],
                print_starting_message=False,
                description=f"tuneline {what} ({recipe or 'params.yaml'}"
                f"{''.join(f', --set {o}' for o in overrides)}) on '{cron}'",
            )
    except KeyboardInterrupt:  # Ctrl-C is how a user stops serving (the terminal sends it to the runs too)
        say("stopped serving")
    except SystemExit:  # SIGTERM (`kill PID`, `docker stop`): Prefect's runner turns it into exit 0
        stop_runs()
        say("stopped serving")
        raise
    finally:
        if server is not None:
            servers.stop_all([server], [])


def stop_runs(grace: float = 60.0) -> None:
    """Interrupt the flow runs this process serves, as a terminal's Ctrl-C would: SIGINT to
    each (a multiprocessing child of Prefect's runner) and to its stage, then wait for them
    to end. On SIGTERM to this process alone they ran on, and the server this process had
    started was stopped under them: a run's final state then retried against it for
    minutes, and the command waited for the run before it could exit."""
    import multiprocessing

    import psutil

    from tuneline.signals import interrupt

    runs = multiprocessing.active_children()
    for run in runs:
        try:
            top = psutil.Process(run.pid)
            interrupt([top, *top.children(recursive=True)])
        except psutil.Error:  # it has just ended
            continue
    for run in runs:
        run.join(grace)


def _params_yaml() -> dict:
    from tuneline import ROOT
    from tuneline.params_file import load_params

    return load_params(ROOT / "params.yaml").model_dump()
