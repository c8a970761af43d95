"""evaluate: base and tuned model on the same test examples, with a paired confidence interval.

Metrics per task (computed in tuneline/scoring.py from per-example statistics):
- descramble: chrF, exact match (whitespace-normalised), corpus BLEU (sacrebleu), and the
  share of outputs that keep exactly the input's multiset of words;
- classify / entail: accuracy, macro-F1 and unparseable rate of free generation, and the
  accuracy and macro-F1 of constrained label scoring (each label's log-likelihood);
- instruct: ROUGE-L F1 (rouge-score);
- every task: token-weighted perplexity over answer tokens (pretrain: over all tokens).
Generation is batched: prompt-only inputs, left padding, KV cache, stop at EOS, greedy or
beam search; a test checks batched greedy outputs equal one-at-a-time ones.

Outputs: metrics/eval.json (base, tuned, delta, and the primary metric's paired bootstrap
CI and p-value), reports/predictions.jsonl (what a reader compares) and
reports/eval_examples.json (per-example records: register compares a challenger with the
champion on them, and logs them with the version for the next comparison).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from components.prepare import read_split
from components.tokenize import encode_rows
from components.train import OUT as MODELS
from tuneline import progress, scoring, tasks
from tuneline.config import Params
from tuneline.io import read_json, write_json, write_text
from tuneline.loss import example_totals
from tuneline.modeling import autocast, cache_dir, device, load_model, load_tokenizer
from tuneline.packing import concat, pack_groups

METRICS = Path("metrics/eval.json")
PREDICTIONS = Path("reports/predictions.jsonl")
EXAMPLES = Path("reports/eval_examples.json")
PRETRAIN_SAMPLES, PRETRAIN_PROMPT_WORDS = 8, 12  # continuations shown for pretraining
SCORE_BATCH = 4  # packed rows per forward when scoring losses


class _StopAfter(StoppingCriteria):
    """Stopping criterion: a row is done once its answer (leading whitespace aside) holds
    `marker`; everything after it would be cut anyway. Greedy only: a beam's finished
    hypotheses would be re-ranked by it."""

    def __init__(self, tok, prompt_len: int, marker: str):
        self.tok, self.prompt_len, self.marker = tok, prompt_len, marker

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([self.marker in t.lstrip() for t in texts], device=input_ids.device)


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, num_beams: int = 1,
             one_line: bool = True) -> list[str]:
    """Greedy (or beam) completions of `prompts`, prompt stripped, cut at EOS and at the end
    of the answer (one-line tasks: the first newline; instruct: the next `###` header)."""
    model.eval()
    tok.padding_side = "left"  # decoder-only: pad on the left so every prompt ends at -1
    marker = "\n" if one_line else "\n###"
    # Similar lengths share a batch: less padding, and a batch stops as soon as all its
    # (similarly long) answers are done.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs: dict[int, str] = {}
    with progress.bar("evaluate", len(prompts), "prompts", what="generating") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            T = enc["input_ids"].shape[1]                       # (B, T) left-padded prompts
            stop = StoppingCriteriaList([_StopAfter(tok, T, marker)] if num_beams == 1 else [])
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, stopping_criteria=stop)
            new = gen[:, T:]                                    # (B, new_tokens): strip the prompt
            for i, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True)):
                text = text.strip()  # chat-tuned models often open with a newline
                outs[i] = text.split(marker)[0].strip()
            # the rate counts generated tokens (padding after a row's end, EOS included, is not work done)
            bar.advance(len(idx), tokens=int((new != tok.pad_token_id).sum()))
    return [outs[i] for i in range(len(prompts))]


def example_nll(model, tok, rows: list[dict], params: Params) -> tuple[list[float], list[int]]:
    """Per unit: summed answer-token loss and answer tokens (teacher forcing). A unit is an
    example, or for pretraining a concatenated block (scored as it is trained). Examples
    are packed for speed; bfd isolates them exactly (tested), so this equals one at a time."""
    examples = encode_rows(tok, rows, tasks.TASKS[params.prepare.task], params.prepare.labels)
    T = params.tokenize.max_length
    if params.tokenize.packing == "concat":
        totals = _scored(model, concat(examples, T, drop_remainder=False), tok.pad_token_id)
        units = [t for row in totals for t in row]
    else:
        packed, groups = pack_groups(examples, max(T, max(len(e.input_ids) for e in examples)), "bfd")
        units = [(0.0, 0)] * len(examples)
        for group, totals in zip(groups, _scored(model, packed, tok.pad_token_id)):
            for i, t in zip(group, totals):
                units[i] = t
    return [u[0] for u in units], [u[1] for u in units]


def _scored(model, packed: list[dict], pad_id: int) -> list[list[tuple[float, int]]]:
    """example_totals over packed rows, a few batches at a time so a bar can follow; the
    batches are the ones one call would make (SCORE_BATCH divides every chunk), so the
    numbers are too."""
    out: list[list[tuple[float, int]]] = []
    with progress.bar("evaluate", len(packed), "sequences", what="scoring") as bar:
        for i in range(0, len(packed), SCORE_BATCH * 8):
            chunk = packed[i:i + SCORE_BATCH * 8]
            out += example_totals(model, chunk, pad_id, SCORE_BATCH)
            bar.advance(len(chunk), tokens=sum(len(r["input_ids"]) for r in chunk))
    return out


def score_labels(model, tok, rows: list[dict], params: Params) -> list[str]:
    """Constrained label scoring: the label whose verbalised answer (" label" + EOS, exactly
    as trained) is most likely given the prompt. Summed, not length-normalised: the
    probability of the whole answer (lm-evaluation-harness's `acc`)."""
    labels = params.prepare.labels
    nll, _ = example_nll(model, tok, [r | {"label": lab} for r in rows for lab in labels], params)
    L = len(labels)
    return [labels[min(range(L), key=lambda j: nll[i * L + j])] for i in range(len(rows))]


def prompts_and_targets(task: tasks.Task, rows: list[dict], labels: list[str]) -> tuple[list[str], list[str]]:
    if task.generates:
        return [list(x) for x in zip(*(tasks.render(task, r, labels) for r in rows))]
    # Pretraining: continue the opening words of a few test paragraphs (shown, not scored).
    words = [r["text"].split() for r in rows[:PRETRAIN_SAMPLES]]
    return [" ".join(w[:PRETRAIN_PROMPT_WORDS]) for w in words], [" " + " ".join(w[PRETRAIN_PROMPT_WORDS:]) for w in words]


def evaluate_model(model, tok, rows: list[dict], params: Params) -> dict:
    """One model's evaluation record on `rows` (see tuneline/scoring.py): generated
    outputs, per-unit answer loss and tokens, and (classify/entail) log-likelihood labels."""
    cfg, task, labels = params.evaluate, tasks.TASKS[params.prepare.task], params.prepare.labels
    model = model.to(device())
    prompts, targets = prompts_and_targets(task, rows, labels)
    # Budget from the data: the longest reference answer plus slack, capped.
    max_new = min(cfg.max_new_tokens, max(len(tok(t)["input_ids"]) for t in targets) + 8)
    t = time.time()
    with autocast(cfg.precision):
        outputs = generate(model, tok, prompts, max_new, cfg.batch_size, cfg.num_beams, task.one_line)
        gen_s = time.time() - t
        nll, tokens = example_nll(model, tok, rows, params)
        scored = score_labels(model, tok, rows, params) if task.name in ("classify", "entail") else None
    return {"outputs": outputs, "nll": nll, "tokens": tokens, "scored": scored, "generation_s": gen_s}


def metrics_of(ev: dict, rows: list[dict], params: Params) -> dict[str, float]:
    task = tasks.TASKS[params.prepare.task]
    return scoring.metrics(task, rows, ev, params.prepare.labels) | {"generation_s": ev["generation_s"]}


def compare(a: dict, b: dict, rows: list[dict], params: Params, test: str = "bootstrap") -> scoring.Comparison:
    """Paired comparison of evaluation `a` with `b` on the same rows, on the primary metric."""
    task, metric = tasks.TASKS[params.prepare.task], params.primary_metric()
    a_stat, b_stat = (scoring.stat(task, metric, rows, ev, params.prepare.labels) for ev in (a, b))
    return scoring.compare(a_stat, b_stat, metric, test, params.evaluate.n_bootstrap, params.seed)


def examples_key(rows: list[dict], params: Params) -> str:
    """What makes two evaluations comparable example by example: the rows and every setting
    that shapes outputs or losses. Registered versions carry it (tag `eval.examples_key`)."""
    blob = json.dumps([rows, params.prepare.task, params.prepare.labels, tasks.TEMPLATE_VERSION,
                       params.tokenize.max_length, params.tokenize.packing,
                       params.evaluate.model_dump(include={"num_beams", "max_new_tokens", "precision"})], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _base_cache_key(rows: list[dict], params: Params) -> str:
    """Base results depend only on the base model, the examples, the eval settings and the
    code that generates and scores losses."""
    code = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in (__file__, example_totals.__code__.co_filename)]
    blob = json.dumps([params.model.name, examples_key(rows, params), params.evaluate.batch_size, code])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def evaluate_base(rows: list[dict], params: Params) -> dict:
    """The base model's record, computed once per key and kept in .cache/eval (a train-only
    change then re-scores only the tuned model)."""
    path = cache_dir().parent / "eval" / f"base-{_base_cache_key(rows, params)}.json"
    if path.is_file():
        print(f"[evaluate] base results reused from {path}", flush=True)
        return read_json(path)
    name = params.model.name
    ev = evaluate_model(load_model(name), load_tokenizer(name), rows, params)
    write_json(path, ev)
    return ev


def _show(c: scoring.Comparison) -> str:
    return (f"{c.metric} {c.a:.4g} vs {c.b:.4g}: delta {c.delta:+.4g}, 95% CI [{c.ci_low:+.4g}, {c.ci_high:+.4g}], "
            f"p={c.p_value:.3g} ({c.test}, n={c.n})")


def run(params: Params) -> dict:
    from tuneline.tracking import log_figure, log_metrics, log_table

    task = tasks.TASKS[params.prepare.task]
    rows = read_split("test")[: params.evaluate.n_examples]
    evs: dict[str, dict] = {}
    print(f"[evaluate] base model ({params.model.name}) on {len(rows)} test examples", flush=True)
    evs["base"] = evaluate_base(rows, params)
    print(f"[evaluate] tuned model on the same {len(rows)} examples", flush=True)
    tuned = str(MODELS / "merged")
    evs["tuned"] = evaluate_model(load_model(tuned), load_tokenizer(tuned), rows, params)
    results = {which: metrics_of(ev, rows, params) for which, ev in evs.items()}
    for which in ("base", "tuned"):
        print(f"[evaluate] {which}: " + ", ".join(f"{k}={v:.4g}" for k, v in results[which].items()), flush=True)
    results["delta"] = {k: results["tuned"][k] - results["base"][k] for k in task.metrics}
    comparison = compare(evs["tuned"], evs["base"], rows, params)
    print(f"[evaluate] tuned vs base, {_show(comparison)}", flush=True)
    results |= {"primary_metric": params.primary_metric(), "n_examples": len(rows),
                "tuned_vs_base": asdict(comparison)}
    key = examples_key(rows, params)
    write_json(EXAMPLES, {"examples_key": key, "model": params.model.name, **evs})
    write_json(METRICS, results)
    prompts, targets = prompts_and_targets(task, rows, params.prepare.labels)
    table = {"prompt": prompts, "target": [t.strip() for t in targets],
             "base_output": evs["base"]["outputs"], "tuned_output": evs["tuned"]["outputs"]}
    if evs["tuned"]["scored"] is not None:
        table |= {"base_scored_label": evs["base"]["scored"], "tuned_scored_label": evs["tuned"]["scored"]}
    write_text(PREDICTIONS, "".join(json.dumps(dict(zip(table, vals))) + "\n" for vals in zip(*table.values())))
    for which in ("base", "tuned"):
        log_metrics(results[which], prefix=f"{which}_")
    log_metrics({"delta": comparison.delta, "delta_ci_low": comparison.ci_low, "delta_ci_high": comparison.ci_high,
                 "p_value": comparison.p_value}, prefix=f"tuned_vs_base_{comparison.metric}_")
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
        ax.bar([f"base\n{vals[0]:.3g}", f"tuned\n{vals[1]:.3g}"], vals, color=["#999999", "#2b7bba"])
        title = m + (" (lower is better)" if m in tasks.LOWER_IS_BETTER else "")
        if m == c["metric"]:
            ax.errorbar([1], [vals[1]], yerr=[[c["delta"] - c["ci_low"]], [c["ci_high"] - c["delta"]]],
                        fmt="none", ecolor="black", capsize=4)
            title += f"\nprimary: delta {c['delta']:+.3g}\n95% CI [{c['ci_low']:+.3g}, {c['ci_high']:+.3g}]"
        ax.set_title(title, fontsize=9)
        if min(vals) >= 0:  # the metrics are non-negative: keep 0 at the bottom, even when both are 0
            ax.set_ylim(bottom=0)
    fig.suptitle(f"base vs tuned on {results['n_examples']} test examples", fontsize=10)
    return fig


def load_any(ref: str):
    """(model, tokenizer) from a registry/run URI (models:/name@alias, models:/name/3,
    runs:/id/model) or anything model.name accepts (built-in name, local folder, hub id)."""
    if ref.split(":", 1)[0] in ("models", "runs", "mlflow-artifacts"):
        import mlflow

        from tuneline.errors import TunelineError
        from tuneline.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
        try:
            parts = mlflow.transformers.load_model(ref, return_type="components")
        except Exception as e:  # MlflowException, missing artifacts, not a transformers model
            raise TunelineError(f"cannot load '{ref}' ({str(e).splitlines()[0][:120]})",
                                "check the name/version/alias with `tuneline history` or the MLflow UI") from None
        model, tok = parts["model"], parts["tokenizer"]
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return model.float(), tok
    return load_model(ref), load_tokenizer(ref)


def evaluate_file(ref: str, params: Params, data: str, limit: int = 0) -> dict:
    """Evaluate model `ref` on a file (or any prepare.source form) of the recipe's data shape:
    rows are validated, cleaned and templated exactly as prepare does for a test split."""
    import random

    from components.prepare import dedupe, source_rows

    task = tasks.TASKS[params.prepare.task]
    rows, lineage = source_rows(data, params, "--data")
    rows = dedupe(rows, task)[: limit or None]
    if task.name == "descramble":  # files of plain sentences get seeded scrambles, as prepare does
        rng = random.Random(f"{params.seed}-test")
        for r in rows:
            r["source"] = r["source"] or tasks.scramble(r["target"], rng)
    print(f"[evaluate] {ref} on {len(rows)} examples of {data}", flush=True)
    model, tok = load_any(ref)
    ev = evaluate_model(model, tok, rows, params)
    prompts, targets = prompts_and_targets(task, rows, params.prepare.labels)
    return {"model": ref, "task": task.name, "data": lineage, "n_examples": len(rows),
            "primary_metric": params.primary_metric(), "metrics": metrics_of(ev, rows, params),
            "predictions": [{"prompt": p, "target": t.strip(), "output": o}
                            for p, t, o in zip(prompts, targets, ev["outputs"])]}
