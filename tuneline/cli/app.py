"""The `tuneline` Typer app and what every command shares: the console, one-line errors,
the project's params, and the MLflow client. The commands themselves live in the
modules next to this one, one per group (see tuneline/cli/__init__.py)."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from tuneline import ROOT
from tuneline.errors import INTERRUPTED, TunelineError, print_error

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


# What `tuneline --version` names besides tuneline: the libraries whose versions decide results
STACK = ("torch", "transformers", "peft", "datasets", "mlflow", "prefect", "dvc")


def _version(asked: bool) -> None:
    """`tuneline --version`: its version and the stack's, for a bug report (no library is imported)."""
    if not asked:
        return
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    out.print(
        f"tuneline {of('tuneline')} (Python {sys.version.split()[0]}; "
        + ", ".join(f"{n} {of(n)}" for n in STACK)
        + ")",
        markup=False,
        highlight=False,
    )
    raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors (here and in the stages)."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print tuneline's version and its stack's, and exit."
    ),
) -> None:
    _state["debug"] = debug
    if debug:
        os.environ["TUNELINE_DEBUG"] = "1"  # the stage processes DVC starts inherit it


def fail(e: Exception) -> None:
    """Print a TunelineError as its one line (or raise it under --debug) and exit 2."""
    if _state["debug"]:
        raise e
    print_error(str(e))
    raise typer.Exit(2)


SET_HELP = "Override one param, e.g. --set train.lr=0.001 (repeatable)."


def recipe_opt(help: str):
    """The --recipe option of run, sweep, schedule and evaluate: a recipe's name, or its file."""
    return typer.Option(None, "--recipe", "-r", metavar="NAME", callback=recipe_option, help=help)


def sets_opt(help: str = SET_HELP):
    """The repeatable --set KEY=VALUE option of the same commands."""
    return typer.Option([], "--set", "-s", metavar="KEY=VALUE", help=help)


def recipe_option(given: str | None) -> str | None:
    """--recipe's callback: the recipe's name, also from `recipes/emotion.yaml` (recipes.name_of)."""
    from tuneline import recipes

    try:
        return given and recipes.name_of(given)
    except TunelineError as e:
        fail(e)


PATH_PARAMS = ("prepare.source", "prepare.test_source", "model.name")  # params that may name a local path


def typed_here(sets: list[str]) -> list[str]:
    """The --set overrides, with a path typed in a subfolder of the project made relative
    to the project root, where params paths are read: `prepare.source=*.txt` typed in
    corpus/ becomes `corpus/*.txt` (said once). A path the working directory does not hold
    (a hub id, a path meant from the root) is left as it is."""
    import glob

    from tuneline import sources

    here = os.getcwd()
    if here == str(ROOT):
        return list(sets)
    typed = []
    for item in sets:
        key, _, value = item.partition("=")
        spec = value.strip().strip("'\"")
        prefix, path = sources.local_part(spec)
        held = glob.glob(path) if glob.has_magic(path) else os.path.exists(path)
        if key.strip() in PATH_PARAMS and path and not os.path.isabs(path) and held:
            rooted = prefix + os.path.relpath(sources.from_cwd(spec).removeprefix(prefix), ROOT)
            out.print(
                f"{key.strip()}: '{spec}' (typed in {os.path.relpath(here, ROOT)}/) is '{rooted}' from the project root"
            )
            item = f"{key}={rooted}"
        typed.append(item)
    return typed


def params_of(recipe: str | None, sets: list[str], smoke: bool = False):
    """The recipe's params (params.yaml's without one) with the --set overrides, validated."""
    from tuneline import recipes
    from tuneline.params_file import load_params

    return recipes.build(recipe, list(sets), smoke, None if recipe else load_params(ROOT / "params.yaml").model_dump())


def model_name(name: str | None) -> str:
    """`name`, or the project's register.model_name."""
    from tuneline import require_project
    from tuneline.params_file import load_params

    return name or load_params(require_project() / "params.yaml").register.model_name


def mlflow_client():
    """An MLflow client on the checked store. The default store is the project's mlflow.db,
    so without MLFLOW_TRACKING_URI the command must run inside the project."""
    import mlflow

    from tuneline import require_project
    from tuneline.store import use_store

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        require_project()
    use_store()
    return mlflow.MlflowClient()


def main() -> None:
    """The `tuneline` command: errors are one line (red on a terminal); tracebacks only with --debug."""
    from tuneline.errors import debug, out_of_memory, report
    from tuneline.signals import exit_code, interrupt_outside_imports, stacks_on_request

    interrupt_outside_imports()  # a Ctrl-C during a lazy import waits for it (tuneline/signals.py)
    stacks_on_request()  # kill -USR1 PID: where each thread is
    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside a stage (a stage reports its own)
        print_error(INTERRUPTED)
        sys.exit(exit_code())
    except SystemExit as e:
        # typer ends a command that Ctrl-C interrupted with a silent exit 130 (`raise Exit(130)
        # from` the KeyboardInterrupt); a command that said why itself exits with no cause
        if e.code == 130 and isinstance(getattr(e.__context__, "__cause__", None), KeyboardInterrupt):
            print_error("interrupted. Fix: run the same command again")
        if e.code == 130:  # the commands say 130 for any interrupt: 143 after SIGTERM
            sys.exit(exit_code())
        raise
    except Exception as e:  # not a TunelineError: those exit through fail
        if _state["debug"] or debug():
            raise
        command = " ".join(["tuneline", *[a for a in sys.argv[1:] if not a.startswith("-")][:1]])
        fixable = out_of_memory(e, command)  # e.g. `tuneline evaluate` with too large a batch
        if fixable is not None:
            print_error(str(fixable))
            sys.exit(2)
        print_error(report(e, "tuneline"))
        sys.exit(1)
