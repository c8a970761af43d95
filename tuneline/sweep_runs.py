"""A sweep in MLflow: one parent run per sweep, holding the summary table and the plot of the
metric against the swept params; each arm is a child run (its stages open it: see
store.arm_record). The flow that puts a sweep in order is flows/sweep.py."""

from __future__ import annotations

import time

from tuneline import sweep
from tuneline.config import Params
from tuneline.tracking import log_params, setup


def create_parent(params: Params, arms: list[sweep.Arm], spec: str) -> str:
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


def named(parent: str, name: str) -> str:
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


def abandon(parent: str, names: list[str]) -> None:
    """Mark KILLED the runs of arms `names` that an attempt left RUNNING or FINISHED (a
    Ctrl-C or a dead worker between two of its stages ends no run): each arm's run is then
    the attempt that finishes it, and the UI shows one finished run per arm."""
    from mlflow import MlflowClient

    client = MlflowClient()
    exp_id = client.get_run(parent).info.experiment_id
    for n in names:
        for run in client.search_runs(
            [exp_id], filter_string=f"tags.`dvc.experiment` = '{n}' and tags.`mlflow.parentRunId` = '{parent}'"
        ):
            if run.info.status in ("RUNNING", "FINISHED"):
                client.set_terminated(run.info.run_id, "KILLED")


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


def record(parent: str, names, arms, arm_params, results, sel, metric: str) -> None:
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
