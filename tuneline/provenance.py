"""What a registered version records so that it can be compared later, and reading it back:
the artifacts logged with its run (per-example records, the champion it faced, its
predictions, its test rows), the code's git commit and the data's DVC hashes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

EVAL_ARTIFACT = "eval/examples.json"  # the run's per-example records, for the next comparison
# The champion's per-example record on this run's test rows, as its gate compared them (its
# own records when it was scored on these; else the re-evaluation), so that the review
# pairs every example the gate paired.
FACED_ARTIFACT = "eval/faced.json"
PREDICTIONS_ARTIFACT = "eval/predictions.jsonl"  # each test example's input, reference and outputs
ROWS_ARTIFACT = "eval/rows.jsonl"  # the test examples those records were scored on


def artifact_text(run_id: str | None = None, path: str | None = None, uri: str | None = None) -> str:
    """The text of one logged artifact (`run_id` + `path`, or a full `uri`). MLflow copies a
    run's artifact into a fresh temporary folder of its own and leaves it there, one more in
    /tmp for every register and every `tuneline diff`: download into one we remove."""
    import os
    import tempfile

    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # small files: no bars
    with tempfile.TemporaryDirectory(prefix="tuneline-artifact-") as tmp:
        got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, artifact_uri=uri, dst_path=tmp)
        return Path(got).read_text()


NO_COMMIT = "unknown"  # the git.commit tag of a run made outside a git checkout


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        # "-dirty" when code or params differ from the commit; files the pipeline itself
        # writes (dvc.lock, metrics, plots, reports) do not count.
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!dvc.lock",
                ":!metrics",
                ":!plots",
                ":!reports",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else NO_COMMIT
    except (OSError, subprocess.TimeoutExpired):
        return NO_COMMIT


def data_hashes(lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """md5 of the prepared and tokenized data as DVC recorded them."""
    if not lock.is_file():
        return {}
    from tuneline.data import PREPARED, TOKENIZED

    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {
        f"data.{stage}.md5": out.get("md5", "")
        for stage, path in (("prepare", PREPARED), ("tokenize", TOKENIZED))
        for out in stages.get(stage, {}).get("outs", [])
        if out.get("path") == path.as_posix()  # the data, not the stage's metrics file
    }
