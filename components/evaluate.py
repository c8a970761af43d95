"""evaluate: base and tuned model on the same test examples.

Metrics per task (tuneline/tasks.py):
- descramble: exact match (whitespace-normalised), corpus BLEU and chrF (sacrebleu), and
  the share of outputs that keep exactly the input's multiset of words;
- classify / entail: accuracy, macro-F1 over the declared labels, unparseable rate;
- instruct: ROUGE-L F1 (rouge-score);
- every task: perplexity over answer tokens (pretrain: over all tokens).
Generation is batched: prompt-only inputs, left padding, KV cache, stop at EOS.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch

from components.prepare import read_split
from components.tokenize import encode_rows
from components.train import OUT as MODELS
from tuneline import tasks
from tuneline.config import Params
from tuneline.io import read_json, write_json, write_text
from tuneline.loss import mean_loss
from tuneline.modeling import autocast, cache_dir, load_model, load_tokenizer
from tuneline.packing import concat, pack

METRICS = Path("metrics/eval.json")
PREDICTIONS = Path("reports/predictions.jsonl")
PRETRAIN_SAMPLES, PRETRAIN_PROMPT_WORDS = 8, 12  # continuations shown for pretraining


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, num_beams: int = 1,
             one_line: bool = True) -> list[str]:
    """Greedy (or beam) completions of `prompts`, prompt stripped, cut at EOS (and newline)."""
    model.eval()
    tok.padding_side = "left"  # decoder-only: pad on the left so every prompt ends at -1
    # Similar lengths share a batch: less padding, and a batch stops as soon as all its
    # (similarly long) answers reach EOS.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]  # (B, new_tokens): strip the prompt
        for i, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True)):
            text = text.strip()  # chat-tuned models often open with a newline
            outs[i] = text.split("\n")[0].strip() if one_line else text.split("\n###")[0].strip()
        print(f"[evaluate]   generated {len(outs)}/{len(prompts)}", flush=True)
    return [outs[i] for i in range(len(prompts))]


def perplexity(model, tok, rows: list[dict], params: Params) -> float:
    """Token-weighted perplexity over trained tokens (teacher forcing), on packed rows.
    bfd isolates examples exactly (tested), so packing only removes padding work; pretraining
    is scored on the same concatenated blocks it trains on."""
    task = tasks.TASKS[params.prepare.task]
    examples = encode_rows(tok, rows, task, params.prepare.labels)
    T = params.tokenize.max_length
    if params.tokenize.packing == "concat":
        packed = concat(examples, T, drop_remainder=False)
    else:
        packed = pack(examples, max(T, max(len(e.input_ids) for e in examples)), "bfd")
    return math.exp(mean_loss(model, packed, tok.pad_token_id, 4))


def score(task: tasks.Task, outputs: list[str], rows: list[dict], labels: list[str]) -> dict[str, float]:
    n = len(rows)
    if task.name == "descramble":
        import sacrebleu

        targets = [tasks.normalise(r["target"]) for r in rows]
        outputs = [tasks.normalise(o) for o in outputs]
        return {"exact_match": sum(o == t for o, t in zip(outputs, targets)) / n,
                "bleu": sacrebleu.corpus_bleu(outputs, [targets]).score,
                "chrf": sacrebleu.corpus_chrf(outputs, [targets]).score,
                "multiset_rate": sum(tasks.same_words(o, r["source"]) for o, r in zip(outputs, rows)) / n}
    if task.name in ("classify", "entail"):
        from sklearn.metrics import f1_score

        preds = [tasks.parse_label(o, labels) for o in outputs]
        gold = [r["label"] for r in rows]
        return {"accuracy": sum(p == g for p, g in zip(preds, gold)) / n,
                "macro_f1": float(f1_score(gold, [p or "<unparseable>" for p in preds], labels=labels,
                                           average="macro", zero_division=0)),
                "unparseable_rate": sum(p is None for p in preds) / n}
    if task.name == "instruct":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        return {"rouge_l": sum(scorer.score(r["output"], o)["rougeL"].fmeasure for o, r in zip(outputs, rows)) / n}
    return {}


def prompts_and_targets(task: tasks.Task, rows: list[dict], labels: list[str]) -> tuple[list[str], list[str]]:
    if task.generates:
        return [list(x) for x in zip(*(tasks.render(task, r, labels) for r in rows))]
    # Pretraining: continue the opening words of a few test paragraphs (shown, not scored).
    words = [r["text"].split() for r in rows[:PRETRAIN_SAMPLES]]
    return [" ".join(w[:PRETRAIN_PROMPT_WORDS]) for w in words], [" " + " ".join(w[PRETRAIN_PROMPT_WORDS:]) for w in words]


def evaluate_model(model, tok, rows: list[dict], params: Params) -> tuple[dict, list[str]]:
    cfg, task, labels = params.evaluate, tasks.TASKS[params.prepare.task], params.prepare.labels
    prompts, targets = prompts_and_targets(task, rows, labels)
    # Budget from the data: the longest reference answer plus slack, capped.
    max_new = min(cfg.max_new_tokens, max(len(tok(t)["input_ids"]) for t in targets) + 8)
    t = time.time()
    with autocast(cfg.precision):
        outputs = generate(model, tok, prompts, max_new, cfg.batch_size, cfg.num_beams, task.one_line)
        gen_s = time.time() - t
        ppl = perplexity(model, tok, rows, params)
    return score(task, outputs, rows, labels) | {"perplexity": ppl, "generation_s": gen_s}, outputs


def _base_cache_key(rows: list[dict], params: Params) -> str:
    """Base results depend only on the base model, the examples, the task, eval params and this code."""
    blob = json.dumps([params.model.name, rows, params.evaluate.model_dump(), params.prepare.task, params.prepare.labels,
                       params.tokenize.max_length, params.tokenize.packing, tasks.TEMPLATE_VERSION,
                       hashlib.sha256(Path(__file__).read_bytes()).hexdigest()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def evaluate_base(rows: list[dict], params: Params) -> tuple[dict, list[str]]:
    """The base model's results, computed once per key and kept in .cache/eval (a train-only
    change then re-scores only the tuned model)."""
    path = cache_dir().parent / "eval" / f"base-{_base_cache_key(rows, params)}.json"
    if path.is_file():
        print(f"[evaluate] base results reused from {path}", flush=True)
        cached = read_json(path)
        return cached["metrics"], cached["outputs"]
    name = params.model.name
    metrics, outputs = evaluate_model(load_model(name), load_tokenizer(name), rows, params)
    write_json(path, {"metrics": metrics, "outputs": outputs})
    return metrics, outputs


def run(params: Params) -> dict:
    from tuneline.tracking import log_metrics, log_table

    task = tasks.TASKS[params.prepare.task]
    rows = read_split("test")[: params.evaluate.n_examples]
    results, preds = {}, {}
    print(f"[evaluate] base model ({params.model.name}) on {len(rows)} test examples", flush=True)
    results["base"], preds["base"] = evaluate_base(rows, params)
    print(f"[evaluate] tuned model on the same {len(rows)} examples", flush=True)
    tuned = str(MODELS / "merged")
    results["tuned"], preds["tuned"] = evaluate_model(load_model(tuned), load_tokenizer(tuned), rows, params)
    for which in ("base", "tuned"):
        print(f"[evaluate] {which}: " + ", ".join(f"{k}={v:.4g}" for k, v in results[which].items()), flush=True)
    results["delta"] = {k: results["tuned"][k] - results["base"][k] for k in task.metrics}
    results["primary_metric"] = params.primary_metric()
    results["n_examples"] = len(rows)
    write_json(METRICS, results)
    prompts, targets = prompts_and_targets(task, rows, params.prepare.labels)
    table = {"prompt": prompts, "target": [t.strip() for t in targets],
             "base_output": preds["base"], "tuned_output": preds["tuned"]}
    write_text(PREDICTIONS, "".join(json.dumps(dict(zip(table, vals))) + "\n" for vals in zip(*table.values())))
    for which in ("base", "tuned"):
        log_metrics(results[which], prefix=f"{which}_")
    log_table(table, "predictions.json")
    return results
