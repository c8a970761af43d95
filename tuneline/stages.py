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
    from tuneline import distributed
    from tuneline.config import load_params

    if name not in stage_names():
        raise TunelineError(f"unknown stage '{name}'", f"choose one of: {', '.join(stage_names())}")
    from_file = params is None
    params = params or load_params(ROOT / "params.yaml")
    if name == "train" and distributed.world() == 1:
        # One training run per machine; torchrun's workers run under their launcher's lock.
        from tuneline.lock import machine_lock

        with machine_lock("train"):
            return _run(name, params, from_file)
    return _run(name, params, from_file)


def _run(name: str, params, from_file: bool) -> dict:
    import contextlib

    import torch

    from tuneline import distributed
    from tuneline.tracking import stage_run

    if name == "train" and params.train.nproc > 1 and distributed.world() == 1:
        if not from_file:
            raise TunelineError("train.nproc > 1 needs the stage started from params.yaml",
                                "set train.nproc: 1 for in-process (smoke) runs")
        code = distributed.launch(params.train.nproc, name)
        if code:
            raise TunelineError(f"train: a data-parallel process failed (torchrun exit {code})",
                                "see the first error above; train.nproc: 1 runs in one process")
        from tuneline.io import read_json

        return read_json("metrics/train.json")
    torch.manual_seed(params.seed)
    module = importlib.import_module(f"components.{name}")
    t = time.time()
    # Under torchrun only rank 0 opens the MLflow run (the others log nothing).
    with stage_run(name, params) if distributed.is_main() else contextlib.nullcontext():
        metrics = module.run(params)
    print(f"[{name}] done in {time.time() - t:.1f}s", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tuneline.stages STAGE", file=sys.stderr)
        return 2
    from tuneline.errors import debug, print_error, report

    try:
        run_stage(argv[0])
    except TunelineError as e:
        print_error(str(e))
        return 2
    except Exception as e:  # unforeseen: one line here, the traceback in a file (or here with --debug)
        if debug():
            raise
        print_error(report(e, argv[0]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
