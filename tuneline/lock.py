"""One training run per machine: an advisory file lock that every way of training takes
(Prefect flow, `dvc repro`, `tuneline run`, a served schedule), so two runs never fight
over the same cores or GPU. The kernel releases it when the holder exits, however it
exits (SIGKILL included), so a crash never leaves a stale lock behind."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def lock_path(name: str) -> Path:
    """Machine-wide by default (the temp dir); TUNELINE_LOCK_DIR narrows or moves it."""
    return Path(os.environ.get("TUNELINE_LOCK_DIR") or tempfile.gettempdir()) / f"tuneline-{name}.lock"


@contextlib.contextmanager
def machine_lock(name: str = "train") -> Iterator[Path]:
    """Hold the named lock for the block; wait (saying who holds it) if it is taken."""
    with _held(lock_path(name), name, wait=True) as path:
        yield path


@contextlib.contextmanager
def project_lock(root: Path) -> Iterator[Path]:
    """One `tuneline run` per project at a time: a second one is refused at once with one
    line naming the first (they would write the same params.yaml, outputs and dvc.lock;
    DVC alone would stop it mid-way with "busy")."""
    path = root / ".cache" / "run.lock"
    try:
        held = _held(path, "run", wait=False)
        held.__enter__()
    except OSError:  # a read-only project: nothing can be written, and the run says so itself
        yield path
        return
    try:
        yield path
    finally:
        held.__exit__(None, None, None)


class _Busy(Exception):
    """A training slot another process holds."""


@contextlib.contextmanager
def _held(path: Path, name: str, wait: bool) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file: flock works on a read-only fd too
        fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "unknown holder"
            if not wait and name.startswith("train"):
                raise _Busy(name) from None
            if not wait:
                from tuneline.errors import TunelineError

                raise TunelineError(
                    f"another tuneline {name} is in progress in this project ({holder})",
                    "wait for it to finish (or stop it with Ctrl-C), then run again",
                ) from None
            print(
                f"[{name}] another {name} run is in progress ({holder}); waiting for it to finish "
                f"(one {name} run per machine: {path})",
                flush=True,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):  # read-only fd: the lock still holds
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} in {os.getcwd()} since {time.strftime('%H:%M:%S')}".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


SLOTS_ENV = "TUNELINE_TRAIN_SLOTS"  # set by `tuneline sweep --jobs N` for its arms: N GPUs, one arm each


@contextlib.contextmanager
def train_slot(slots: int = 1, poll: float = 2.0) -> Iterator[int | None]:
    """The lock a training run holds. One slot: the machine-wide `train` lock (yields None).
    N slots, one per GPU (a sweep's `--jobs N`): the first free of N device locks, slot 0
    being the machine-wide lock itself (a plain run trains on device 0); with all N held it
    waits for any. Yields the device index the holder trains on."""
    if slots <= 1:
        with machine_lock("train"):
            yield None
        return
    names = ["train", *(f"train-gpu{i}" for i in range(1, slots))]
    said = False
    while True:
        for i, name in enumerate(names):
            try:
                with _held(lock_path(name), name, wait=False):
                    yield i
                    return
            except _Busy:
                continue
        if not said:
            print(f"[train] all {slots} training slots are in use; waiting for one", flush=True)
            said = True
        time.sleep(poll)
