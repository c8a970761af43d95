"""Atomic writes: a stage's outputs appear whole or not at all.

Everything is written under a temporary sibling (`.<name>.tmp<pid>`) and renamed into
place, so a killed stage leaves only hidden debris that neither DVC nor the next stage
reads, and the previous output stays whole (dvc.yaml marks outputs `persist`, so DVC does
not delete them before a run either). The next write to the same path sweeps up the
debris of writers that are no longer alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # PermissionError: alive, but another user's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def sweep(path: Path) -> None:
    """Remove `.<name>.tmp<pid>` / `.<name>.old<pid>` siblings left by dead writers."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)(\d+)$")
    if not path.parent.is_dir():
        return
    for item in path.parent.iterdir():
        m = pattern.match(item.name)
        if m and (int(m.group(2)) == os.getpid() or not _alive(int(m.group(2)))):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    item.unlink()


def _tmp(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}{os.getpid()}")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    tmp = _tmp(path)
    tmp.mkdir()
    try:
        yield tmp
        share_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Two renames: a kill between them leaves the old output under .old<pid> and the new
    # one under .tmp<pid>, never a mix; `path` missing means "not finished" to DVC.
    old = _tmp(path, "old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def share_modes(folder: Path) -> None:
    """Give the *.safetensors under `folder` the mode the umask gives any new file.

    safetensors >= 0.8 writes through a temp file and renames it, so its files are 0600
    whatever the umask (safetensors#782): the model folder's other files are 0644, and
    another user, a container's non-root user or a model server then reads "No such file"
    for the weights alone."""
    mask = os.umask(0)  # the only portable way to read it: set, then restore at once
    os.umask(mask)
    for f in folder.rglob("*.safetensors"):
        with contextlib.suppress(OSError):  # a mount without modes (FAT, some network shares)
            f.chmod(0o666 & ~mask)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """An open temporary file that replaces `path` (os.replace) only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    tmp = _tmp(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno and not e.filename:  # say which file (a write error names none)
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def rewrite_user_file(path: Path, text: str) -> None:
    """Replace a file the user owns and may have locked down (params.yaml): refuse, in one
    line, one whose permissions say read-only (never chmod it); keep its permissions; and
    write in place when it cannot be replaced by rename (a file bind-mounted on its own,
    as `docker -v params.yaml:...` gives, answers EBUSY)."""
    import errno
    import stat

    from tuneline.errors import TunelineError

    mode = path.stat().st_mode if path.exists() else None
    if mode is not None and not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise TunelineError(
            f"{path.name} is read-only (mode {stat.S_IMODE(mode):o}), so --recipe/--set cannot write it",
            f"make it writable (chmod u+w {path.name}), or edit it yourself and run without --recipe/--set",
        )
    try:
        with atomic_file(path) as f:
            f.write(text)
            if mode is not None:
                os.chmod(f.name, stat.S_IMODE(mode))
    except OSError as e:
        if e.errno not in (errno.EBUSY, errno.EXDEV):
            raise
        with open(path, "r+") as f:  # EROFS etc. raise here, as the one-line disk/permission error
            f.write(text)
            f.truncate()


def shown(path: str | Path) -> str:
    """`path` as a message shows it: from the working directory when it lies below it
    ('reports/x.json'), else absolute ('/tmp/x.json', not '../../tmp/x.json')."""
    rel = os.path.relpath(path)
    return str(Path(path).resolve()) if rel == ".." or rel.startswith(".." + os.sep) else rel


def check_out_file(path: Path, flag: str, example: str, what: str | None = None) -> None:
    """Before any work: refuse an output file the command could not write at its end (a
    folder; a path through a file; a place where no file can be made, such as /proc or a
    read-only mount), or, when `what` names the format (e.g. "JSON"), a name without
    `example`'s suffix: `--out test.csv` would have replaced the user's data with JSON.
    Missing folders are fine: writing makes them. `example` names a file to suggest inside
    a folder given by mistake."""
    from tuneline.errors import TunelineError

    if path.is_dir():
        raise TunelineError(f"{flag} '{path}' is a folder", f"give a file path, e.g. {flag} {path / example}")
    suffix = Path(example).suffix
    if what and path.suffix.lower() != suffix:
        raise TunelineError(
            f"{flag} '{path}' does not end in {suffix}, and what is written there is {what}",
            f"give a {suffix} path, e.g. {flag} {path.with_suffix(suffix)}",
        )
    folder = path.parent
    while not folder.exists():  # the nearest folder that exists: the rest is made on write
        folder = folder.parent
    if not folder.is_dir():
        raise TunelineError(
            f"{flag} '{path}' goes through '{folder}', which is a file",
            f"give a path inside a folder, e.g. {flag} {example}",
        )
    why = unwritable(folder)
    if why:
        raise TunelineError(
            f"{flag} '{path}': no file can be written in '{folder}' ({why})",
            f"give a path in a folder you can write to, e.g. {flag} {example}",
        )


def unwritable(folder: Path) -> str | None:
    """Why no file can be made in the existing `folder`, or None when one can. It tries:
    os.access cannot tell (root passes it everywhere; /proc and read-only mounts)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tuneline-probe-"):
            return None
    except OSError as e:
        return e.strerror or str(e)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def torch_save(obj: Any, path: str | Path) -> None:
    """torch.save through a Python file: a full disk raises OSError(ENOSPC), not the C++
    writer's opaque "unexpected pos" RuntimeError, and a torn file is never in place."""
    import torch

    with atomic_file(path, "wb") as f:
        torch.save(obj, f)


def sha256(path: Path) -> str:
    """Content hash of one file, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def kept_sha256(paths: list[Path], known_file: Path) -> list[str]:
    """sha256 of each file, kept in `known_file` by (path, size, mtime, inode), as DVC keeps
    its own: a file is read again only when it changed, and the hashes of its earlier
    versions are forgotten. A cache that cannot be written costs only the re-reading."""
    try:
        known = json.loads(known_file.read_text())
    except (OSError, ValueError):
        known = {}
    before, out = dict(known), []
    for f in paths:
        st, where = f.stat(), str(f.resolve())
        key = f"{where}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        if key not in known:
            known = {k: v for k, v in known.items() if k.rsplit(":", 3)[0] != where}
            known[key] = sha256(f)
        out.append(known[key])
    if known != before:
        with contextlib.suppress(OSError):
            write_json(known_file, known)
    return out


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
