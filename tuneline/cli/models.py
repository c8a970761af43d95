"""Commands that use a model: `predict` (the champion answers one input) and `evaluate`
(any model on any file with a recipe's columns)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import typer

from tuneline import ROOT
from tuneline.cli.app import app, fail, mlflow_client, out, params_of, recipe_opt, sets_opt, typed_here
from tuneline.errors import TunelineError, print_error
from tuneline.io import shown


def default_out(model: str, data: str, how: str) -> Path:
    """reports/evaluate/<model>-<data>[-<prompting>].json, in file-name characters. A glob's
    '*' reads as 'all' ('part-*.jsonl': part-all), so a glob names its file too."""
    import re

    named = f"{model}-{Path(data).stem.replace('*', 'all')}" + ("" if how == "plain" else f"-{how}")
    # strip('._'): '../models/merged' typed in a subfolder is 'models_merged', not a hidden '.._models_merged'
    return ROOT / "reports" / "evaluate" / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', named).strip('._')}.json"


def free_out(path: Path, source: str) -> Path:
    """`path`, or when it holds the evaluation of another data source (two folders' `test.jsonl`
    share a name), the first of `<name>-2.json`, `<name>-3.json`, … that is free or holds this
    source's: a default report is replaced only by the same model on the same data."""
    import json

    def other(p: Path) -> bool:
        try:
            return json.loads(p.read_text()).get("data", {}).get("source") != source
        except (OSError, ValueError, AttributeError):  # not one of ours: left as it is
            return True

    candidate, n = path, 1
    while candidate.exists() and other(candidate):
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def check_tuned_for(ref: str, params, where: str) -> None:
    """Refuse to score a model tuneline tuned for another task (or other labels) than
    `params` read the data as: its answers to a prompt it never saw would be scored as if
    they meant something (a descrambler scored 0 on emotion tweets, with no word of why).
    `where`: what set params' task (params.yaml or a recipe), for the message."""
    from tuneline import recipes
    from tuneline.serving import differs, tuned_for

    found = tuned_for(ref)
    what = differs(found, params)
    if what == "task":
        fits = recipes.for_task(found[0])
        raise TunelineError(
            f"{ref} was tuned for the {found[0]} task, and {where} reads the data as {params.prepare.task} rows",
            f"pass --recipe {' or --recipe '.join(fits)}" if fits else f"pass --set prepare.task={found[0]}",
        )
    if what == "labels":
        raise TunelineError(
            f"{ref} answers with the labels {found[1]}, and {where} declares {list(params.prepare.labels)}",
            f"pass the recipe it was trained with, or --set prepare.labels=[{','.join(found[1])}]",
        )


@app.command()
def predict(
    texts: list[str] = typer.Argument(
        ...,
        metavar="TEXT...",
        help="The inputs, e.g. scrambled words for the descrambler, or named fields as JSON "
        """('{"instruction": "...", "input": "..."}'), or for a chat model a conversation ending with a user """
        """turn ('{"messages": [{"role": "user", "content": "..."}, ...]}'); '-' reads one input per line from stdin.""",
    ),
    model: str = typer.Option(
        None,
        help="Model URI (default: models:/<register.model_name>@champion), or a folder tuneline trained "
        "(models/merged, `tuneline export`'s).",
    ),
    name: str = typer.Option(
        None, "--name", help="Registered model whose champion answers (default: register.model_name)."
    ),
    free: bool = typer.Option(
        False, "--free", help="Decode freely (else a descrambler keeps the input's words, as evaluate scored it)."
    ),
    beams: int = typer.Option(
        None, "--beams", min=1, help="Beam search with N beams (default: what the version was evaluated with)."
    ),
    labels: bool = typer.Option(
        False,
        "--labels",
        help="A classifier answers with its most likely label (constrained label scoring, evaluate's "
        "scored_accuracy), never with other text.",
    ),
) -> None:
    """Answer with the champion model from the MLflow registry.

    Several inputs (or '-' for stdin's lines) are answered in batches, one answer per
    line in their order (a line break inside an answer is written \\n)."""
    try:
        import sys

        from tuneline import predict as pred
        from tuneline import registry

        if labels and (free or beams):
            raise TunelineError("--labels scores the labels; it does not decode", "drop --free and --beams")
        if model and name:
            raise TunelineError("--model and --name both say which model answers", "give one of them")
        uri, task = model, None
        if uri is None and name is None:  # the project's champion, whose task params.yaml names
            from tuneline import require_project, tasks
            from tuneline.params_file import load_params

            params = load_params(require_project() / "params.yaml")
            name, task = params.register.model_name, tasks.TASKS[params.prepare.task]
        texts = pred.inputs(texts, sys.stdin, task.serve_example if task else "")
        client = mlflow_client()
        if uri is None:
            registry.require_model(client, name)
            registry.require_champion(
                client,
                name,
                "answer with v{version} (`tuneline history` says why the gate kept it out): "
                "--model models:/{name}/{version}",
            )
            uri = f"models:/{name}@champion"
        constrain = "labels" if labels else "none" if free else None
        loaded, answered = pred.load(uri), 0
        try:
            for answer in pred.stream(loaded, texts, constrain, beams):  # printed as each request ends
                out.print(answer, markup=False, highlight=False, soft_wrap=True)
                answered += 1
        except KeyboardInterrupt:  # typer would exit 130 without a word
            print_error(pred.interrupted(answered, len(texts)))
            raise typer.Exit(130) from None
    except TunelineError as e:
        fail(e)


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
        help="A CSV/TSV/JSON/JSONL/Parquet file (or any prepare.source form) with the recipe's columns.",
    ),
    recipe: str = recipe_opt("The recipe whose task, template and labels apply (default: params.yaml)."),
    sets: list[str] = sets_opt("Override one param, e.g. --set evaluate.num_beams=4."),
    how: Literal["plain", "chat", "few_shot"] = typer.Option(
        "plain",
        "--prompting",
        "-p",
        help="How prompts are given, as evaluate gives them to the base model: plain (the task's "
        "prompt, as a tuned model is trained), chat (the user turn of the model's chat template) or "
        "few_shot (evaluate.base_shots solved examples from this project's train split first).",
    ),
    limit: int = typer.Option(0, help="Evaluate only the first N examples (0: all)."),
    output: Path = typer.Option(
        None,
        "--out",
        "-o",
        help="Where the JSON goes (default: reports/evaluate/<model>-<data>.json, or -2, -3, … when that holds another file's).",
    ),
) -> None:
    """Evaluate any model on any file with a recipe's columns.

    Prints the metrics, saves them as JSON and logs them to MLflow."""
    try:
        import json

        from tuneline import sources
        from tuneline.evaluation import evaluate_file
        from tuneline.io import check_out_file, write_json
        from tuneline.secrets import redact
        from tuneline.tracking import log_params, setup

        if limit < 0:
            raise TunelineError(f"--limit {limit} is negative", "give 0 (every example) or how many to evaluate")
        if not model.strip():  # else read as the folder '' (the working directory)
            raise TunelineError(
                "--model is empty", "give models:/NAME@ALIAS, models:/NAME/VERSION, a model folder or a model name"
            )
        if output is not None:  # the evaluation is saved as one JSON file, after all the work
            check_out_file(output, "--out", "evaluation.json", "JSON")
        from tuneline import require_project

        require_project()
        params = params_of(recipe, typed_here(sets))
        # an argument's path is from where it was typed (in params, from the project root)
        path = os.path.expanduser(model)
        ref = os.path.abspath(path) if os.path.exists(path) else model
        check_tuned_for(ref, params, f"the recipe {recipe}" if recipe else "params.yaml")
        result = evaluate_file(ref, params, sources.from_cwd(data), limit, how)
        said = "" if how == "plain" else f", {how} prompting"  # in the run's name and the printout
        path = output or free_out(default_out(model, data, how), result["data"].get("source"))
        write_json(path, result)
        import mlflow

        setup(params.register.experiment)
        with mlflow.start_run(
            run_name=f"evaluate {model} on {Path(data).name}{said}",
            tags={
                "tuneline.kind": "evaluation",
                "tuneline.model": redact(model),
                "tuneline.data": redact(data),
                "tuneline.prompting": how,
            },
        ) as run:
            log_params(mlflow.MlflowClient(), run.info.run_id, params)
            mlflow.log_metrics({k: float(v) for k, v in result["metrics"].items()})
            mlflow.log_text(json.dumps(result, indent=2), "evaluation.json")
    except TunelineError as e:
        fail(e)
        return
    out.print(f"[bold]{model}[/] on {result['n_examples']} examples of {data} ({result['task']}{said}):")
    for k, v in result["metrics"].items():
        star = " (primary)" if k == result["primary_metric"] else ""
        out.print(f"  {k:<18} {v:.4g}{star}")
    out.print(f"  saved: {shown(path)}; MLflow run {run.info.run_id} in experiment '{params.register.experiment}'")
