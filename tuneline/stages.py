"""The stage list has one source of truth: dvc.yaml. The flow, the CLI and the stage
runner read it from there, in the order written (which a test checks is a valid order)."""

from __future__ import annotations

import importlib
import os
import resource
import sys
import time
from pathlib import Path

from tuneline import ROOT
from tuneline.errors import TunelineError


def stage_names(dvc_yaml: Path | None = None) -> list[str]:
    import yaml

    path = dvc_yaml or ROOT / "dvc.yaml"
    if not path.is_file():
        raise TunelineError(f"{path} not found", "run tuneline from the project root")
    return list(yaml.safe_load(path.read_text())["stages"])


def run_stage(name: str, params=None) -> dict:
    """Validate params, open the stage's MLflow child run, run `components.<name>.run`.
    `params` defaults to params.yaml (smoke runs pass their own and run in-process).
    Training takes the machine's train lock, and with train.nproc > 1 starts torchrun."""
    import contextlib

    import torch

    from tuneline import distributed
    from tuneline.lock import SLOTS_ENV, train_slot
    from tuneline.params_file import load_params
    from tuneline.tracking import stage_run

    if name not in stage_names():
        raise TunelineError(f"unknown stage '{name}'", f"choose one of: {', '.join(stage_names())}")
    from_file = params is None
    params = params or load_params(ROOT / "params.yaml")
    single = distributed.world() == 1
    from tuneline import preflight

    # `dvc repro` too: a run bound to fail on its params fails before writing (the flow
    # checked its params once for all its stages)
    if from_file and single and not preflight.passed(params):
        preflight.check(params)
    # One training run per machine (or per GPU, for a sweep's --jobs N: lock.train_slot);
    # torchrun's workers run under their launcher's lock.
    slots = int(os.environ.get(SLOTS_ENV) or 1)
    slotted = name == "train" or (name == "validate" and slots > 1)  # an arm scores on its own GPU too
    with train_slot(slots) if slotted and single else contextlib.nullcontext() as slot:
        if slot is not None:
            torch.cuda.set_device(slot)  # this arm's GPU: hardware.device() is the current device
        if name == "train" and params.train.nproc > 1 and single:
            if not from_file:
                raise TunelineError(
                    "train.nproc > 1 needs the stage started from params.yaml",
                    "set train.nproc: 1 for in-process (smoke) runs",
                )
            code = distributed.launch(params.train.nproc, name)
            if code:
                raise TunelineError(
                    f"train: a data-parallel process failed (torchrun exit {code})",
                    "see the first error above; train.nproc: 1 runs in one process",
                )
            from tuneline.data import metrics_file
            from tuneline.io import read_json

            return read_json(metrics_file("train"))
        torch.manual_seed(params.seed)
        module = importlib.import_module(f"components.{name}")
        t = time.time()
        # Under torchrun only rank 0 opens the MLflow run (the others log nothing).
        with stage_run(name, params) if distributed.is_main() else contextlib.nullcontext():
            metrics = module.run(params)
        # Peak resident memory of this process (of all stages so far, when run in-process).
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"[{name}] done in {time.time() - t:.1f}s, peak RSS {peak_gb:.2f} GB", flush=True)
        return metrics


ERROR_FILE = "TUNELINE_ERROR_FILE"  # set by the flow: the stage's one-line error goes there
# Packages every stage imports: one of them missing means DVC started the stage on a Python
# that is not tuneline's environment (dvc.yaml's `python` is the first on PATH).
STACK = ("yaml", "torch", "rich", "mlflow", "transformers", "pydantic", "numpy", "pyarrow", "peft")


def main(argv: list[str] | None = None) -> int:
    """`python -m tuneline.stages STAGE` (what dvc.yaml runs). Exit 0, or 2 with one line
    for a problem the user can fix, 1 for an unforeseen one (traceback saved to a file)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tuneline.stages STAGE", file=sys.stderr)
        return 2
    import os
    import signal

    from tuneline.errors import debug, known, report
    from tuneline.signals import exit_code, interrupt_outside_imports, on_parent_death, stacks_on_request

    stacks_on_request()  # kill -USR1 PID: where each thread is
    try:
        # A Ctrl-C that reached the flow just before DVC started us never reaches us: we stop
        # when it exits, rather than run on unseen.
        on_parent_death(signal.SIGINT)
        # The flow starts stages with SIGINT blocked, so that a Ctrl-C during start-up waits
        # until here, where it becomes the one "interrupted" line; one during a library's
        # import waits for the import to finish (half-imported modules broke the rest).
        interrupt_outside_imports()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        run_stage(argv[0])
    except TunelineError as e:
        return _failed(str(e), 2)
    except KeyboardInterrupt:
        code = _failed(
            f"{argv[0]}: interrupted. Fix: re-run it; finished stages and checkpoints are reused", exit_code()
        )
        # Exit now: MLflow's exit hook would end the active run with a write that a lock the
        # interrupt left held makes wait for ~20 s (tracking.stage_run has recorded what it could).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    except Exception as e:  # memory, a full disk or a read-only path is the user's to fix; the rest is unforeseen
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in STACK:
            return _failed(
                f"{argv[0]}: this Python ({sys.executable}) has no module '{e.name}', so it is not the environment "
                "tuneline is installed in (DVC runs the `python` first on PATH). Fix: activate that environment "
                "before `dvc repro` (source .venv/bin/activate), or run `tuneline run`, which finds it",
                2,
            )
        fixable = known(e, argv[0])
        if fixable is not None:
            return _failed(str(fixable), 2)
        if debug():
            raise
        return _failed(report(e, argv[0]), 1)
    return 0


def _failed(line: str, code: int) -> int:
    """Print the line, or hand it to the flow that started this stage (it prints it once, last)."""
    import os

    from tuneline.errors import print_error
    from tuneline.secrets import redact

    path = os.environ.get(ERROR_FILE)
    if path:
        if not Path(path).is_file():  # the flow ended first (Ctrl-C), and said so itself
            return code
        try:
            Path(path).write_text(f"{code}\n{redact(line)}\n")
            return code
        except OSError:
            pass
    print_error(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
