"""tuneline: reproducible fine-tuning of GPT-2-family causal LMs.

Importing the package pins the environment every entry point needs to run offline and
quietly (hub offline, no telemetry, Prefect/DVC state inside the project). Values the
user already exported win.
"""

import os
from pathlib import Path


def find_root(start: Path) -> Path:
    """The project root, found as git finds its repository: the nearest directory, from
    `start` upwards, holding a dvc.yaml. Outside any project, `start` itself (commands that
    need a project then refuse: see `require_project`)."""
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return start


ROOT = (
    Path(os.environ["TUNELINE_ROOT"]).resolve() if os.environ.get("TUNELINE_ROOT") else find_root(Path.cwd().resolve())
)


def require_project() -> Path:
    """ROOT, or a one-line error when no tuneline project holds the working directory (so a
    command never creates a new empty mlflow.db or params.yaml somewhere else)."""
    if not (ROOT / "dvc.yaml").is_file():
        from tuneline.errors import TunelineError

        raise TunelineError(
            f"not inside a tuneline project: no dvc.yaml in {ROOT} or any folder above it",
            "cd into the project (the clone of tuneline) or set TUNELINE_ROOT to it",
        )
    return ROOT


def origin() -> Path:
    """The project the user works in: ROOT, except in a sweep arm, which DVC's queue runs in
    a temporary copy of it (.dvc/tmp/exps/…) holding only what git tracks. There it is the
    project the arm was queued from (DVC sets DVC_ROOT to it)."""
    queued = os.environ.get("DVC_ROOT") if os.environ.get("DVC_EXP_NAME") else None
    return Path(queued) if queued else ROOT


def located(path: str | Path) -> Path:
    """Where a path from the params (a data file or glob, a local model folder) or a
    stage's output is: relative ones in the project. A sweep arm's copy holds what git
    tracks and what its own stages made (its models/merged, not the project's), so a path
    is taken there when the copy has it, else in the project the arm was queued from (an
    untracked data file beside it, a local model folder)."""
    import glob

    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    here = ROOT / path
    if origin() == ROOT or here.exists() or (glob.has_magic(str(path)) and glob.glob(str(here))):
        return here
    return origin() / path


_ENV_DEFAULTS = {
    # Without this MLflow/transformers retry the unreachable hub for ~47 s.
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # MLflow's INFO lines ("Creating initial MLflow database tables...", "Validating input
    # example against model signature") say nothing a user acts on; warnings still show.
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_HOME": str(ROOT / ".prefect"),
    "DVC_SITE_CACHE_DIR": str(ROOT / ".dvc" / "site-cache"),
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    # Prefect's temporary server gets 20 s to start; a busy 2-core machine can need more.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "GIT_PYTHON_REFRESH": "quiet",
}
if not os.isatty(1) or os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
    # Logs and CI get our plain progress lines (tuneline/progress.py), not tqdm's redraws
    # ("Loading weights: 100%|████|") from transformers and the hub client.
    _ENV_DEFAULTS["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    # Raw tqdm bars too: SmolLM2's GGUF conversion, MLflow's "Downloading artifacts: 14%|█▍ |".
    _ENV_DEFAULTS["TQDM_DISABLE"] = "1"
for _k, _v in _ENV_DEFAULTS.items():
    os.environ.setdefault(_k, _v)


def _quiet_known_warnings() -> None:
    """Warnings a user can do nothing about, printed by every LoRA train and register: peft
    reads `model.is_gradient_checkpointing`, which transformers 5 deprecates."""
    import warnings

    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


_quiet_known_warnings()

__version__ = "0.1.0"
