"""evaluate: base and tuned model on the same test examples, with a paired confidence interval.

Metrics per task (each task's `score`, tuneline/tasks.py; per-example statistics in
tuneline/scoring.py):
- descramble: chrF, exact match (whitespace-normalised), corpus BLEU (sacrebleu), and the
  share of outputs that keep exactly the input's multiset of words;
- classify / entail: accuracy, macro-F1 and unparseable rate of free generation, and the
  accuracy and macro-F1 of constrained label scoring (each label's log-likelihood);
- instruct: ROUGE-L F1 (rouge-score);
- every task: token-weighted perplexity over answer tokens (pretrain: over all tokens).
How a model is scored is tuneline/evaluation.py.

Writes metrics/eval.json (base, tuned, delta, and the primary metric's paired bootstrap
CI and p-value), reports/predictions.jsonl (what a reader compares) and
reports/eval_examples.json (per-example records: register compares a challenger with the
champion on them, and logs them with the version for the next comparison).
"""

from __future__ import annotations

import json
from dataclasses import asdict

from tuneline import prompting, scoring, tasks
from tuneline.config import Params
from tuneline.data import EVAL_EXAMPLES, MODELS, PREDICTIONS, PREPARED, metrics_file, trained_model
from tuneline.evaluation import (
    SCORING_PARAMS,
    compare,
    evaluate_base,
    evaluate_model,
    examples_key,
    metrics_of,
    prompts_and_targets,
    test_rows,
)
from tuneline.io import write_json, write_text
from tuneline.modeling import load_model, load_tokenizer

PARAMS = (*SCORING_PARAMS, "evaluate.base_prompting", "evaluate.base_shots", "evaluate.n_bootstrap")
INPUTS = (PREPARED, MODELS)
OUTS = (PREDICTIONS, EVAL_EXAMPLES)


def _show(c: scoring.Comparison) -> str:
    return (
        f"{c.metric} {c.a:.4g} vs {c.b:.4g}: delta {c.delta:+.4g}, 95% CI [{c.ci_low:+.4g}, {c.ci_high:+.4g}], "
        f"p={c.p_value:.3g} ({c.test}, n={c.n})"
    )


def run(params: Params) -> dict:
    from tuneline.tracking import log_figure, log_metrics, log_table

    task = tasks.TASKS[params.prepare.task]
    rows, dropped = test_rows(params)  # refuses when none fits
    print(f"[evaluate] base model ({params.model.name}) on {len(rows)} test examples", flush=True)
    bases = evaluate_base(rows, params)  # {prompting: record}
    by_prompting = {kind: metrics_of(ev, rows, params) for kind, ev in bases.items()}
    for kind, res in by_prompting.items():
        print(f"[evaluate] base, {kind} prompting: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()), flush=True)
    # The tuned model faces the base at its best: the prompting best on the primary metric.
    won = prompting.best(by_prompting, params.primary_metric())
    print(f"[evaluate] tuned model on the same {len(rows)} examples", flush=True)
    tuned = trained_model()
    evs = {"base": bases[won], "tuned": evaluate_model(load_model(tuned), load_tokenizer(tuned), rows, params)}
    results = {"base": by_prompting[won], "tuned": metrics_of(evs["tuned"], rows, params)}
    print("[evaluate] tuned: " + ", ".join(f"{k}={v:.4g}" for k, v in results["tuned"].items()), flush=True)
    results["delta"] = {k: results["tuned"][k] - results["base"][k] for k in task.metrics}
    comparison = compare(evs["tuned"], evs["base"], rows, params)
    print(f"[evaluate] tuned vs base ({won} prompting), {_show(comparison)}", flush=True)
    results |= {
        "base_prompting": won,
        "base_by_prompting": by_prompting,
        "primary_metric": params.primary_metric(),
        "n_examples": len(rows),
        "n_dropped_overlong": dropped,
        "tuned_vs_base": asdict(comparison),
    }
    key = examples_key(rows, params)
    write_json(EVAL_EXAMPLES, {"examples_key": key, "model": params.model.name, "base_prompting": won, **evs})
    write_json(metrics_file("evaluate"), results)
    prompts, targets = prompts_and_targets(task, rows, params.prepare.labels, load_tokenizer(tuned))
    table = {
        "prompt": prompts,
        "target": [t.strip() for t in targets],
        "base_output": evs["base"]["outputs"],
        "tuned_output": evs["tuned"]["outputs"],
    }
    if evs["tuned"]["scored"] is not None:
        table |= {"base_scored_label": evs["base"]["scored"], "tuned_scored_label": evs["tuned"]["scored"]}
    write_text(PREDICTIONS, "".join(json.dumps(dict(zip(table, vals))) + "\n" for vals in zip(*table.values())))
    for which in ("base", "tuned"):
        log_metrics(results[which], prefix=f"{which}_")
    for kind, res in by_prompting.items():
        log_metrics(res, prefix=f"base_{kind}_")
    log_metrics(
        {
            "delta": comparison.delta,
            "delta_ci_low": comparison.ci_low,
            "delta_ci_high": comparison.ci_high,
            "p_value": comparison.p_value,
        },
        prefix=f"tuned_vs_base_{comparison.metric}_",
    )
    log_table(table, "predictions.json")
    log_figure(base_vs_tuned_figure(results), "base_vs_tuned.png")
    return results


def base_vs_tuned_figure(results: dict):
    """One panel per metric (their scales differ: chrF 0-100, exact match 0-1, perplexity
    1-inf): base and tuned bars; the primary metric's panel also shows the paired 95% CI
    of the delta as an interval around the tuned bar (base + [ci_low, ci_high])."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no backend to pick

    names, c = list(results["delta"]), results["tuned_vs_base"]
    fig = Figure(figsize=(2.4 * len(names), 3.2), layout="constrained")
    for ax, m in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        vals = [results["base"][m], results["tuned"][m]]
        # values under the bars, where the CI whisker cannot cover them
        base = f"base ({results.get('base_prompting', 'plain')})"
        ax.bar([f"{base}\n{vals[0]:.3g}", f"tuned\n{vals[1]:.3g}"], vals, color=["#999999", "#2b7bba"])
        title = m + (" (lower is better)" if m in scoring.LOWER_IS_BETTER else "")
        if m == c["metric"]:
            ax.errorbar(
                [1],
                [vals[1]],
                yerr=[[c["delta"] - c["ci_low"]], [c["ci_high"] - c["delta"]]],
                fmt="none",
                ecolor="black",
                capsize=4,
            )
            title += f"\nprimary: delta {c['delta']:+.3g}\n95% CI [{c['ci_low']:+.3g}, {c['ci_high']:+.3g}]"
        ax.set_title(title, fontsize=9)
        if min(vals) >= 0:  # the metrics are non-negative: keep 0 at the bottom, even when both are 0
            ax.set_ylim(bottom=0)
    fig.suptitle(
        f"base (best prompting: {results.get('base_prompting', 'plain')}) vs tuned on {results['n_examples']} test examples",
        fontsize=10,
    )
    return fig
