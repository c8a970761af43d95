"""`tuneline` command line: run the pipeline, open the UIs, predict, check the setup.

Thin commands over the library, one module per group, in the order `--help` lists them:
app.py (the Typer app and what every command shares), pipeline.py (run, sweep, recipes),
models.py (predict, evaluate), versions.py (promote, rollback, history, diff, export) and ops.py
(schedule, ui, dvc-deps, doctor).
"""

import inspect
from importlib import import_module

from tuneline.cli.app import app, main

for _group in ("pipeline", "models", "versions", "ops"):  # each adds its commands to app, in this order
    import_module(f"tuneline.cli.{_group}")

# Typer's rich help joins the lines of a docstring's first paragraph but keeps the source's
# line breaks in the others: at 80 columns `predict --help` read "answered in batches, one
# answer per" / "line in their order". Each paragraph becomes one line, which rich wraps.
for _command in app.registered_commands:
    _doc = _command.help or inspect.getdoc(_command.callback) or ""
    _command.help = "\n\n".join(" ".join(p.split()) for p in _doc.split("\n\n"))

__all__ = ["app", "main"]
