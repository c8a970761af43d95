"""validate: the tuned model scored on the validation split, with the task's metrics.

The validation split is what a user may look at while choosing a configuration: a sweep
(`tuneline sweep`, tuneline/sweep.py) runs each arm up to this stage and picks its winner
here, so that the test split stays for the one final decision (evaluate, then the gate).
Only the tuned model is scored (the base model is the same for every arm).

Writes metrics/validate.json (the task's metrics, as evaluate's `tuned` block) and
reports/val_examples.json (the per-example records a sweep compares its arms on).
"""

from __future__ import annotations

from tuneline.config import Params
from tuneline.data import MODELS, PREPARED, VAL_EXAMPLES, metrics_file, trained_model
from tuneline.evaluation import SCORING_PARAMS, evaluate_model, examples_key, metrics_of, test_rows
from tuneline.io import write_json
from tuneline.modeling import load_model, load_tokenizer

PARAMS = SCORING_PARAMS
INPUTS = (PREPARED, MODELS)
OUTS = (VAL_EXAMPLES,)


def run(params: Params) -> dict:
    from tuneline.tracking import log_metrics

    rows, dropped = test_rows(params, "val")  # refuses when none fits
    print(f"[validate] tuned model on {len(rows)} validation examples", flush=True)
    tuned = trained_model()
    ev = evaluate_model(load_model(tuned), load_tokenizer(tuned), rows, params, stage="validate")
    results = metrics_of(ev, rows, params) | {
        "primary_metric": params.primary_metric(),
        "n_examples": len(rows),
        "n_dropped_overlong": dropped,
    }
    print(
        "[validate] tuned: " + ", ".join(f"{k}={v:.4g}" for k, v in results.items() if isinstance(v, float)),
        flush=True,
    )
    write_json(VAL_EXAMPLES, {"examples_key": examples_key(rows, params), "tuned": ev})
    write_json(metrics_file("validate"), results)
    log_metrics(results, prefix="val_")
    return results
