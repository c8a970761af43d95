"""register: check the merged model against the adapted one, log it to MLflow, register a
version, run the champion gate.

The gate's rules are in tuneline/gate.py; what it decided is tagged on the version, and
its model card (tuneline/card.py) is the version's description.
"""

from __future__ import annotations

import json

from tuneline import gate, parity, provenance, registry, serving
from tuneline.config import Params
from tuneline.data import EVAL_EXAMPLES, MERGED, MODELS, PREDICTIONS, PREPARED, metrics_file, trained_model
from tuneline.errors import TunelineError
from tuneline.evaluation import examples_key, test_rows
from tuneline.io import read_json

# The gate's params (those that say which evaluation it compares, too: `examples_key`), and
# those the model card and version tags quote.
PARAMS = (
    "seed",
    "model.name",
    "prepare.task",
    "prepare.labels",
    "prepare.on_overlap",
    "prepare.near_dup_threshold",
    "train.method",
    "train.lora_r",
    "train.lora_alpha",
    "train.lora_layers",
    "tokenize.max_length",
    "tokenize.overlong",
    "tokenize.packing",
    "evaluate.num_beams",
    "evaluate.batch_size",  # the served model's (tuneline/serving.py settings)
    "evaluate.precision",
    "evaluate.max_new_tokens",
    "evaluate.constrain",
    "evaluate.primary_metric",
    "evaluate.n_bootstrap",
    "register.model_name",
    "register.experiment",
    "register.dry_run",
    "register.min_delta",
    "register.alpha",
    "register.test",
    "register.guardrails",
    "register.parity_prompts",
    "register.parity_tol",
)
INPUTS = (
    PREPARED,
    MODELS,
    metrics_file("prepare"),  # the near-duplicate audit, quoted on the card
    metrics_file("train"),
    metrics_file("evaluate"),
    EVAL_EXAMPLES,
    PREDICTIONS,
)
OUTS = ()


def _inputs(params: Params) -> tuple[dict, dict, list[dict]]:
    """metrics/eval.json, reports/eval_examples.json and the test rows they were made on."""
    fix = "run `dvc repro` (train and evaluate first)"
    evals = metrics_file("evaluate")
    if not (MERGED / "config.json").is_file() or not evals.is_file() or not EVAL_EXAMPLES.is_file():
        raise TunelineError("register: the trained model or the evaluation results are missing", fix)
    rows, _ = test_rows(params)
    record = read_json(EVAL_EXAMPLES)
    if record.get("examples_key") != examples_key(rows, params):
        raise TunelineError("register: the evaluation results are for other test examples or settings", fix)
    return read_json(evals), record, rows


def run(params: Params) -> dict:
    import mlflow

    serving.check_champion_task(params)  # `dvc repro` too: the champion it would face answers this task
    evals, record, rows = _inputs(params)
    if (same := gate.already_registered(params, evals, record)) is not None:
        return same
    checked = parity.check(params, rows, trained_model())  # a broken merge stops here: nothing logged or registered
    info = gate.log_model(params)  # the slow upload happens outside the gate's lock
    # The per-example records and each example's input, reference and outputs: what the
    # next gate compares with (instead of evaluating this model again), and what
    # `tuneline diff` shows a reviewer.
    mlflow.log_text(EVAL_EXAMPLES.read_text(), provenance.EVAL_ARTIFACT)
    mlflow.log_text(PREDICTIONS.read_text(), provenance.PREDICTIONS_ARTIFACT)
    mlflow.log_text("".join(json.dumps(r) + "\n" for r in rows), provenance.ROWS_ARTIFACT)
    with registry.gate_lock(params.register.model_name):
        return gate.gate(params, info, evals, record, rows, checked)
