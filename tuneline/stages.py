"""The stage list has one source of truth: dvc.yaml. The flow, the CLI and the stage
runner read it from there, in the order written (which a test checks is a valid order)."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import yaml

from tuneline import ROOT
from tuneline.errors import TunelineError


def stage_names(dvc_yaml: Path | None = None) -> list[str]:
    path = dvc_yaml or ROOT / "dvc.yaml"
    if not path.is_file():
        raise TunelineError(f"{path} not found", "run tuneline from the project root")
    return list(yaml.safe_load(path.read_text())["stages"])


def run_stage(name: str, params=None) -> dict:
    """Validate params, open the stage's MLflow child run, run `components.<name>.run`.
    `params` defaults to params.yaml (smoke runs pass their own and run in-process)."""
    import torch

    from tuneline.config import load_params
    from tuneline.tracking import stage_run

    if name not in stage_names():
        raise TunelineError(f"unknown stage '{name}'", f"choose one of: {', '.join(stage_names())}")
    params = params or load_params(ROOT / "params.yaml")
    torch.manual_seed(params.seed)
    module = importlib.import_module(f"components.{name}")
    t = time.time()
    with stage_run(name, params):
        metrics = module.run(params)
    print(f"[{name}] done in {time.time() - t:.1f}s", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tuneline.stages STAGE", file=sys.stderr)
        return 2
    try:
        run_stage(argv[0])
    except TunelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
