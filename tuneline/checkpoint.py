"""Resume checkpoints: written atomically, the newest N kept, plus the best one.

    checkpoints/train/step-000012/state.pt   a `Checkpoint`: trainable weights, optimizer,
                                             grad scaler, RNG of every rank, early-stopping
                                             state, loss curve
    checkpoints/train/best/weights.pt        trainable weights at the lowest validation loss
    checkpoints/train/COMPLETE               the run finished and its outputs are written:
                                             the checkpoints stay for inspection, but the next
                                             run trains afresh instead of resuming

Each is written into a temporary sibling and renamed, so a kill at any moment leaves
either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tuneline.data import CHECKPOINTS as DIR
from tuneline.io import atomic_dir, torch_save

_STEP = re.compile(r"step-(\d+)$")


@dataclass
class Checkpoint:
    """The training loop's state: what a checkpoint holds and a resumed run continues from.
    The loop keeps it up to date; weights, optimizer, scaler and RNG are filled in when it
    is saved."""

    fingerprint: str  # the run it belongs to (params, token data, training code)
    step: int = 0  # optimizer steps done
    best: float = math.inf  # lowest validation loss so far
    best_step: int = 0  # the step it was reached at
    bad_evals: int = 0  # validations since then without improvement (early stopping)
    curve: list[dict] = field(default_factory=list)  # one point per step: losses, lr, throughput
    weights: dict = field(default_factory=dict)  # trainable parameters
    opt: dict = field(default_factory=dict)  # optimizer state
    scaler: dict = field(default_factory=dict)  # fp16 gradient scaler state
    rng: list = field(default_factory=list)  # torch RNG state of every rank


def _steps() -> list[Path]:
    """Finished step checkpoints, newest first (temporary `.step-*` debris is not matched)."""
    found = [p for p in DIR.glob("step-*") if _STEP.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(_STEP.match(p.name).group(1)), reverse=True)


def save(ck: Checkpoint, keep: int):
    step = ck.step
    with atomic_dir(DIR / f"step-{step:06d}") as tmp:
        torch_save({f.name: getattr(ck, f.name) for f in dataclasses.fields(ck)}, tmp / "state.pt")
    for old in _steps()[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return DIR / f"step-{step:06d}"


def save_best(weights: dict[str, torch.Tensor], step: int, val_loss: float) -> None:
    with atomic_dir(DIR / "best") as tmp:
        torch_save({"weights": weights, "step": step, "val_loss": val_loss}, tmp / "weights.pt")


def latest(fingerprint: str) -> Checkpoint | None:
    """The newest checkpoint of this exact run (same fingerprint), or None.

    Checkpoints of another configuration, or of a finished run, are deleted: they can
    never be resumed.
    """
    if (DIR / "COMPLETE").exists():
        clear()
        return None
    for path in _steps():
        try:
            ck = Checkpoint(**torch.load(path / "state.pt", weights_only=False))
        except Exception as err:  # unreadable (e.g. disk full while writing), or another format
            print(f"[train] skipping unreadable checkpoint {path} ({type(err).__name__})", flush=True)
            continue
        if ck.fingerprint == fingerprint:
            return ck
        break
    clear()
    return None


def best(step: int) -> dict[str, torch.Tensor] | None:
    """The best weights, if they are the ones recorded at `step` (else they are stale)."""
    path = DIR / "best" / "weights.pt"
    if not path.is_file():
        return None
    ck = torch.load(path, weights_only=False)
    return ck["weights"] if ck["step"] == step else None


def mark_complete() -> None:
    DIR.mkdir(parents=True, exist_ok=True)
    (DIR / "COMPLETE").touch()


def clear() -> None:
    shutil.rmtree(DIR, ignore_errors=True)
