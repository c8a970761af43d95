"""register: log the merged model to MLflow, register a version, run the champion gate.

Every new version gets alias `challenger`. `champion` moves to it only when there is no
champion yet or it beats the champion on the primary metric. The version is tagged with
the git commit, the data hashes from dvc.lock, the params and its metrics.
"""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path

import yaml

from components.evaluate import METRICS as EVAL_METRICS
from components.train import OUT as MODELS
from tuneline import tasks
from tuneline.config import Params, flatten
from tuneline.errors import TunelineError
from tuneline.io import read_json, write_json
from tuneline.tracking import redact

METRICS = Path("metrics/register.json")
# A served request per task: what goes into the template's {prompt}.
EXAMPLES = {"descramble": "cat the on sat mat the", "pretrain": "The history of the city",
            "instruct": "Name three primary colors.", "classify": "i feel wonderful today",
            "entail": "mnli hypothesis: A man is outside. premise: A man walks in the park. target:"}
CHAMPION, CHALLENGER = "champion", "challenger"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        # "-dirty" when code or params differ from the commit; files the pipeline itself
        # writes (dvc.lock, metrics, plots, reports) do not count.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock",
                                ":!metrics", ":!plots", ":!reports"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def data_hashes(lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """md5 of the prepared and tokenized data as DVC recorded them."""
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {f"data.{stage}.md5": out.get("md5", "")
            for stage in ("prepare", "tokenize") for out in stages.get(stage, {}).get("outs", [])}


def gate(client, name: str, version: str | None, primary: str, value: float) -> tuple[bool, str]:
    """Move `champion` to `version` if there is none yet or `value` beats it (higher is
    better, except for tasks.LOWER_IS_BETTER metrics such as perplexity). With version
    None (a dry run) only the decision is returned: nothing is moved or tagged."""
    import math

    from mlflow.exceptions import MlflowException

    if not math.isfinite(value):
        return False, f"{primary} is {value}: a failed evaluation never promotes"
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no such model or no champion alias
        champ = None
    if champ is None:
        promote, why = True, "no champion yet"
    else:
        lower = primary in tasks.LOWER_IS_BETTER
        best = float(champ.tags.get(f"metric.{primary}", "inf" if lower else "-inf"))
        promote = value < best if lower else value > best
        better, worse = ("<", ">=") if lower else (">", "<=")
        why = f"{primary} {value:.4g} {better if promote else worse} champion v{champ.version}'s {best:.4g}"
    if version is None:
        return promote, why
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "gate.decision", "promoted" if promote else "kept champion")
    client.set_model_version_tag(name, version, "gate.reason", why)
    return promote, why


def run(params: Params) -> dict:
    import mlflow
    from mlflow.models import infer_signature
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = MODELS / "merged"
    if not (merged / "config.json").is_file() or not EVAL_METRICS.is_file():
        raise TunelineError("register: trained model or evaluation metrics are missing", "run `dvc repro` (train and evaluate first)")
    evals = read_json(EVAL_METRICS)
    primary = params.primary_metric()
    task = tasks.TASKS[params.prepare.task]
    value = float(evals["tuned"][primary])
    name = params.register.model_name

    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    example = [EXAMPLES[task.name]]
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tok},
        name="model",
        task="text-generation",
        # MLflow fills {prompt} and strips it from the output (return_full_text=False).
        prompt_template=tasks.serving_template(task, params.prepare.labels),
        model_config={"max_new_tokens": params.evaluate.max_new_tokens, "do_sample": False},
        signature=infer_signature(example, ["an answer"]),
        input_example=example,
        save_pretrained=True,  # weights as safetensors
        # Explicit: MLflow's inference would also pin torchvision, which has no CPU wheel here.
        pip_requirements=[f"{pkg}=={metadata.version(pkg)}" for pkg in ("torch", "transformers", "accelerate", "mlflow")],
    )
    client = mlflow.MlflowClient()
    if params.register.dry_run:  # smoke runs: the model is logged to the run, the registry untouched
        promoted, why = gate(client, name, None, primary, value)
        print(f"[register] dry run: model logged to the run, not registered (gate would "
              f"{'promote' if promoted else 'keep the champion'}: {why})", flush=True)
        result = {"version": 0, "promoted": False, "dry_run": True, "reason": why, primary: value}
        write_json(METRICS, result)
        return result
    version = mlflow.register_model(info.model_uri, name).version
    tags = {"git.commit": git_commit(), **data_hashes(),
            "params": redact(json.dumps(flatten(params), sort_keys=True))[:5000],
            "base_model": params.model.name, "method": params.train.method, "primary_metric": primary,
            "run_id": mlflow.active_run().info.run_id}
    tags |= {f"metric.{k}": str(v) for k, v in evals["tuned"].items()}
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    client.set_registered_model_alias(name, CHALLENGER, version)
    promoted, why = gate(client, name, version, primary, value)
    print(f"[register] {name} v{version} -> {'champion' if promoted else 'challenger only'} ({why})", flush=True)
    result = {"version": int(version), "promoted": promoted, "reason": why, primary: value}
    write_json(METRICS, result)
    return result
