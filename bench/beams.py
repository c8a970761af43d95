"""Beam search against greedy decoding for a trained model, on the validation split.

This is the measurement behind the default `evaluate.num_beams: 1`. It uses the project's own
tuned model (models/merged, written by `tuneline run` or `dvc repro validate`), its params,
and the validation rows that the validate stage scores. Each beam count decodes those
rows through `evaluation.evaluate_model`, under the run's `evaluate.constrain`, with the
same model object. Then it scores them with the task's metrics. The test split is never
read: what this shows may be used to choose `evaluate.num_beams`.

Timing: an untimed warm-up, then each beam count in turn in one process. Seconds are also
given as a ratio to greedy, which is the figure that holds on a shared machine.

With --transformers, each beam count also decodes the same prompts, batches and constraint
twice more, generation alone (no answer scoring): with tuneline's beam search, then with
transformers' `generate` (the constraint as its LogitsProcessor). It reports both times,
their ratio, and how many answers are the same. `generate` is the search tuneline used
before `tuneline/beam.py`: it encodes every prompt once per beam and carries finished rows
to the batch's end.

Run (from a project root, after the validate stage):
    python bench/beams.py                 # 1, 2, 4 and 8 beams
    python bench/beams.py --beams 1 4
    python bench/beams.py --beams 1 2 4 8 --transformers
Results: bench/results/beams.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TUNELINE_ROOT", str(Path.cwd()))
os.environ.setdefault("TUNELINE_PROGRESS", "off")
sys.path.insert(0, str(HERE))

from train_vs_seed import machine  # noqa: E402

from tuneline import ROOT, tasks  # noqa: E402
from tuneline.constrain import WordConstraint  # noqa: E402
from tuneline.data import MERGED  # noqa: E402
from tuneline.evaluation import answer_budget, evaluate_model, metrics_of, prompts_and_targets, test_rows  # noqa: E402
from tuneline.generation import generate  # noqa: E402
from tuneline.hardware import autocast  # noqa: E402
from tuneline.modeling import load_model, load_tokenizer  # noqa: E402
from tuneline.params_file import load_params  # noqa: E402


def side_by_side(model, tok, rows: list[dict], params, k: int) -> dict:
    """Generation alone, ours then transformers' `generate`: evaluate's prompts,
    length-sorted batches, answer budget and constraint, in the run's precision."""
    import torch

    task, cfg = tasks.TASKS[params.prepare.task], params.evaluate
    prompts, targets = prompts_and_targets(task, rows, params.prepare.labels, tok)
    max_new = answer_budget(tok, targets, cfg.max_new_tokens)
    words = WordConstraint(tok, [task.words(r) for r in rows]) if params.constrained() else None
    with autocast(cfg.precision):
        t = time.perf_counter()
        ours = generate(model, tok, prompts, max_new, cfg.batch_size, k, task.stop, constraint=words, show=False)
        ours_s = time.perf_counter() - t
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    theirs: dict[int, str] = {}
    tok.padding_side = "left"
    t = time.perf_counter()
    with torch.no_grad(), autocast(cfg.precision):
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            width = enc["input_ids"].shape[1]
            gen = model.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=False,
                num_beams=k,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                logits_processor=None if words is None else words.processor(idx, width, k),
            )
            for i, row in zip(idx, gen[:, width:]):
                text = tok.decode(row, skip_special_tokens=True).strip()
                theirs[i] = (text.split(task.stop)[0] if task.stop else text).strip()
    theirs_s = time.perf_counter() - t
    return {
        "generation_s": round(ours_s, 1),
        "transformers_generation_s": round(theirs_s, 1),
        "vs_transformers": round(ours_s / theirs_s, 2),
        "same_answers": sum(a == theirs[i] for i, a in enumerate(ours)),
    }


def bench(beams: list[int], versus: bool = False) -> dict:
    if not MERGED.is_dir():
        sys.exit(f"error: no tuned model at {MERGED}. Fix: run `dvc repro validate` (or `tuneline run`) first")
    params = load_params(ROOT / "params.yaml")
    rows, _ = test_rows(params, "val")
    model, tok = load_model(str(MERGED)), load_tokenizer(str(MERGED))

    def with_beams(k: int):
        return params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"num_beams": k})})

    evaluate_model(model, tok, rows[:8], with_beams(1), stage="warm-up")  # one-time costs (kernels, vocab walk)
    out = []
    for k in beams:
        p = with_beams(k)
        t = time.perf_counter()
        ev = evaluate_model(model, tok, rows, p, stage=f"{k} beams")
        seconds = time.perf_counter() - t
        metrics = {m: round(v, 4) for m, v in metrics_of(ev, rows, p).items() if isinstance(v, float)}
        metrics.pop("generation_s", None)
        out.append({"num_beams": k, "seconds": round(seconds, 1), **metrics})
        if versus and k > 1:
            out[-1] |= side_by_side(model, tok, rows, p, k)
        print(json.dumps(out[-1]), flush=True)
    greedy = next((r["seconds"] for r in out if r["num_beams"] == 1), None)
    for r in out:
        r["time_vs_greedy"] = round(r["seconds"] / greedy, 2) if greedy else None
    return {
        "model": params.model.name,
        "task": params.prepare.task,
        "constrain": params.evaluate.constrain,
        "split": "val",
        "n_examples": len(rows),
        "batch_size": params.evaluate.batch_size,
        "results": out,
        "machine": machine(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--beams", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--transformers", action="store_true", help="also time transformers' beam search, side by side")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "beams.json")
    args = ap.parse_args()
    result = bench(args.beams, args.transformers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
