"""Atomic writes: a stage's outputs appear whole or not at all.

Everything is written under a temporary sibling and renamed into place; a killed stage
leaves only `.tmp*` debris that neither DVC nor the next stage will read.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def read_parquet(path: str | Path, stage: str) -> list[dict]:
    """Rows of a stage's Parquet output; a missing file names the stage to run."""
    import pyarrow.parquet as pq

    from tuneline.errors import TunelineError

    path = Path(path)
    if not path.is_file():
        raise TunelineError(f"{path} is missing", f"run the {stage} stage first (dvc repro {stage})")
    return pq.read_table(path).to_pylist()
