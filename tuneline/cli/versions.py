"""Commands over the registered versions: move the `champion` alias by hand (`promote`,
`rollback`), list its moves (`history`), review a challenger against it (`diff`), and
write one out as a Hugging Face model folder (`export`)."""

from __future__ import annotations

from pathlib import Path

import typer

from tuneline.cli.app import app, fail, mlflow_client, model_name, out
from tuneline.errors import TunelineError


@app.command()
def promote(
    version: str = typer.Argument(
        ..., help="The version to make champion: 3, v3 (as `history` writes it) or an alias."
    ),
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


def _move(fn, name: str | None, reason: str) -> None:
    from tuneline import registry

    try:
        registry.check_reason(reason)
        client = mlflow_client()
        name = model_name(name)
        registry.require_model(client, name)
        event = fn(client, name)
    except TunelineError as e:
        fail(e)
        return
    before = f"v{event['previous']}" if event["previous"] else "none"
    out.print(
        f"{name}: champion {before} -> v{event['version']} ({event['action']} by {event['who']} "
        f"at {event['when']}: {event['why']})"
    )


@app.command()
def history(name: str = typer.Option(None, "--name", help="Registered model (default: register.model_name).")) -> None:
    """Every move of the `champion` alias, and every gate decision that kept it.

    Each line says when, who, what and why."""
    try:
        from tuneline import registry

        client = mlflow_client()
        name = model_name(name)
        registry.require_model(client, name)
        events = registry.history(client, name) + registry.kept_decisions(client, name)
    except TunelineError as e:
        fail(e)
        return
    if not events:
        out.print(f"{name}: the champion alias has never moved")
    for e in sorted(events, key=lambda e: e["when"]):
        if "decision" in e:  # a gate decision that moved nothing
            # against the base model (no champion yet) the decision says nothing more
            kept = " (kept champion)" if e["decision"] == "kept champion" else ""
            what = f"v{e['version']} not promoted{kept}"
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
        "metrics, 10 points for chrF/BLEU, 0.1 for ROUGE-L, 1 for perplexity).",
    ),
    show: int = typer.Option(5, min=0, help="Examples shown of each list."),
    save: Path = typer.Option(None, "--out", help="Also write the report (Markdown) to this file."),
) -> None:
    """What B fixed and broke against A (the challenger against the champion), by slice, and what changed."""
    try:
        from tuneline import registry, review
        from tuneline.io import check_out_file, write_text

        if threshold is not None and not threshold > 0:  # at 0 an unchanged example is fixed and broken at once
            raise TunelineError(
                f"--threshold {threshold:g} is not a change", "give a number > 0, e.g. --threshold 5 for chrF points"
            )
        if save is not None:
            check_out_file(save, "--out", "review.md")
        client = mlflow_client()
        name = model_name(name)
        registry.require_model(client, name)
        text = review.report(review.side(client, name, a), review.side(client, name, b), threshold, show)
        if save is not None:
            write_text(save, text)
    except TunelineError as e:
        fail(e)
        return
    out.print(text, markup=False, highlight=False)


@app.command()
def export(
    folder: Path = typer.Argument(..., help="Where the Hugging Face model folder goes (a new or empty folder)."),
    version: str = typer.Option("champion", "--version", help="A version (3 or v3) or an alias."),
    name: str = typer.Option(None, "--name", help="Registered model (default: register.model_name)."),
    hub: str = typer.Option(
        None, "--hub", metavar="REPO", help="Also upload the folder to this hub repository (created private if new)."
    ),
) -> None:
    """Write a registered version as a plain Hugging Face model folder.

    The merged weights and tokenizer as registered, generation_config.json set to decode as
    the version was evaluated, and a README.md with the hub's metadata, a transformers
    example (run and checked against tuneline's own answer first) and the model card."""
    try:
        from tuneline import export as exporting
        from tuneline import registry

        exporting.check_dest(folder)  # before the registry is read and "[export]" is said
        if hub is not None:
            exporting.check_hub(hub)
        client = mlflow_client()
        name = model_name(name)
        registry.require_model(client, name)
        if version.strip() == registry.CHAMPION:  # the default: say which version there is instead
            registry.require_champion(client, name, "export it by number: --version {version}")
        chosen = registry.version(client, name, version)
        out.print(f"[export] {name} v{chosen.version} -> {folder}", markup=False, highlight=False)
        done = exporting.export(chosen, folder)
        shown = done["answer"] if len(done["answer"]) <= 120 else done["answer"][:119] + "…"
        out.print(
            f"{name} v{chosen.version} exported to {done['folder']}: {', '.join(done['files'])}\n"
            f"checked: with transformers alone it answers {done['example']!r} with {shown!r}, as tuneline does",
            markup=False,
            highlight=False,
        )
        if hub is not None:
            out.print(f"uploaded to the hub: {exporting.push(folder, hub, chosen)}", markup=False, highlight=False)
    except TunelineError as e:
        fail(e)
