"""`tuneline` command line: run the pipeline, open the UIs, predict, check the setup.

Thin commands over the library, one module per group, in the order `--help` lists them:
app.py (the Typer app and what every command shares), pipeline.py (run, sweep, recipes),
models.py (predict, evaluate), versions.py (promote, rollback, history, diff, export) and ops.py
(schedule, ui, dvc-deps, doctor).
"""

from importlib import import_module

from tuneline.cli.app import app, main

for _group in ("pipeline", "models", "versions", "ops"):  # each adds its commands to app, in this order
    import_module(f"tuneline.cli.{_group}")

__all__ = ["app", "main"]
