"""Which MLflow store a process uses, and whether it answers.

The store is MLFLOW_TRACKING_URI, else the project's `mlflow.db` (SQLite, its artifacts in
`mlartifacts/` beside it). A sweep arm that DVC's queue runs in a temporary copy of the
project uses the sweep's store instead (`arm_record`). Every command checks the store
first (`check_store`: one line in seconds, where MLflow retries for minutes), and its first
use goes through `open_store`, which creates a new SQLite store's tables once.
"""

from __future__ import annotations

import contextlib
import os

from tuneline import ROOT
from tuneline.secrets import redact

ARMS = ".cache/sweep-arms"  # under the project root: <experiment name>.json per queued arm


def default_uri() -> str:
    return f"sqlite:///{ROOT / 'mlflow.db'}"


def tracking_uri() -> str:
    arm = arm_record()
    return (arm or {}).get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def in_store(ref: str) -> bool:
    """Whether `ref` names a model in the MLflow store (models:/NAME@ALIAS, models:/NAME/3,
    runs:/ID/model), rather than anything model.name accepts."""
    return ref.split(":", 1)[0] in ("models", "runs", "mlflow-artifacts")


def use_store() -> None:
    """Point MLflow at the store, once it is checked to answer (in seconds, where MLflow
    would retry an unreachable server for minutes)."""
    import mlflow

    check_store()
    mlflow.set_tracking_uri(tracking_uri())


def arm_record() -> dict | None:
    """In a sweep arm run by DVC's queue: {"name", "sweep_run_id", "tracking_uri"} as the
    sweep wrote them before queueing it; else None. DVC sets DVC_EXP_NAME for a queued
    experiment, and DVC_ROOT to the project it was queued from."""
    import json
    from pathlib import Path

    name, root = os.environ.get("DVC_EXP_NAME"), os.environ.get("DVC_ROOT")
    if not name or not root:
        return None
    path = Path(root) / ARMS / f"{name}.json"
    try:
        return json.loads(path.read_text()) | {"name": name}
    except (OSError, ValueError):
        return None


def sqlite_path(uri: str):
    """The file of a `sqlite:///` store, else None."""
    from pathlib import Path

    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve()


def check_store(uri: str | None = None, to_serve: bool = False) -> None:
    """Fail in seconds, with one line, when the MLflow store cannot be used: a tracking
    server that does not answer, a database that refuses, an SQLite file that is not a
    database. (MLflow itself would retry an unreachable server for minutes, and `mlflow
    server` a wrong database for an hour.) `to_serve`: the store `tuneline ui` is about to
    serve, which a tracking server cannot be."""
    from tuneline.errors import TunelineError

    uri = uri or tracking_uri()
    shown, scheme = redact(uri), uri.split(":", 1)[0].lower()
    if to_serve and scheme in ("http", "https", "databricks"):
        raise TunelineError(
            f"MLFLOW_TRACKING_URI is a tracking server ({shown}), not a store to serve",
            "open that server in a browser, or unset MLFLOW_TRACKING_URI to serve the project's store",
        )
    fix = "start it (`tuneline ui` serves one on 127.0.0.1:5000), or unset MLFLOW_TRACKING_URI to use the project's mlflow.db"
    if scheme in ("http", "https"):
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                if r.status == 200:
                    return
                why = f"HTTP {r.status}"
        except Exception as e:  # refused, unknown host, timed out, HTTP error
            why = " ".join(str(getattr(e, "reason", None) or e).split())[:120]
        raise TunelineError(f"the MLflow tracking server {shown} does not answer ({redact(why)})", fix)
    if scheme.startswith(("postgresql", "mysql", "mssql")):
        try:
            import sqlalchemy

            engine = sqlalchemy.create_engine(
                uri, connect_args={"connect_timeout": 10} if scheme.startswith("postgresql") else {}
            )
            try:
                with engine.connect():
                    pass
            finally:
                engine.dispose()
        except ImportError as e:
            raise TunelineError(
                f"no driver for the MLflow store {shown} ({e})", "install the pinned stack: `make install`"
            ) from None
        except Exception as e:  # refused, unknown host, wrong password, missing database
            why = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            raise TunelineError(
                f"cannot connect to the MLflow store {shown} ({redact(why)[:160]})",
                "start the database, or fix MLFLOW_TRACKING_URI",
            ) from None
    elif sqlite_path(uri) is not None:
        import sqlite3

        path = sqlite_path(uri)
        if path.is_file():
            try:
                with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
                    db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.DatabaseError as e:
                raise TunelineError(
                    f"the MLflow store {path} is not a usable SQLite database ({e})",
                    f"move it aside (mv {path} {path}.bad) to start a new store, or set "
                    "MLFLOW_TRACKING_URI to another one",
                ) from None


def open_store() -> str:
    """Point MLflow at the store and return its URI. The first use of a new SQLite store
    creates its tables: one process does while the others wait (two pipelines started
    together would otherwise both run the schema migrations, and one fail on "duplicate
    column name: step"). The lock is taken every time: a store being created already has a
    non-empty file. Whatever reads or writes the store first goes through here."""
    import logging

    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)  # a new store's migrations, line by line
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    db = sqlite_path(uri)
    if db is not None:
        import hashlib

        from tuneline.lock import machine_lock

        with machine_lock(f"store-{hashlib.sha256(str(db).encode()).hexdigest()[:12]}"):
            mlflow.MlflowClient().search_experiments(max_results=1)
    return uri
