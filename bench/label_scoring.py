"""Constrained label scoring: each prompt encoded once and every label scored from its KV
cache, against every (prompt, label) pair scored as a whole example.

Both sides score the same N emotion test rows (`splits.write_splits` on the emotion recipe,
`prepare.n_test=N`) with the same model object, precision (fp32) and batch size:
- pairs: what `score_labels` did before: N x L examples (prompt + " label" + EOS), packed
  with bfd into rows of tokenize.max_length (each example isolated by the 4-D mask), scored
  by `evaluation.example_nll`, the label with the lowest summed answer loss;
- cached: `evaluation.score_labels` now: a batch of prompts encoded once (`generation.prefill`), then
  every label's answer scored from a copy of each prompt's cache (`generation.score_branches`). The
  evaluate stage does this inside generation, so there the prompt costs nothing extra.
Checked: the picked labels must be identical, and the per-label log-probabilities are
compared (largest absolute difference). Timing: an untimed warm-up, then both side by side
in one process; on a shared machine the ratio is the figure.

Run (from the project root):
    python bench/label_scoring.py                            # smollm2-135m-instruct, N=200
    python bench/label_scoring.py --model tiny-gpt2 --n 16   # quick check of the harness
Results: bench/results/label_scoring.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TUNELINE_ROOT", str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from train_vs_seed import machine  # noqa: E402

from tuneline import recipes, tasks  # noqa: E402
from tuneline.data import read_split  # noqa: E402
from tuneline.evaluation import answer_branches, example_nll, prompts_and_targets  # noqa: E402
from tuneline.generation import answer  # noqa: E402
from tuneline.modeling import load_model, load_tokenizer  # noqa: E402
from tuneline.splits import write_splits  # noqa: E402
from tuneline.tokenization import encode_batch  # noqa: E402


def pairs(model, tok, rows, params) -> tuple[list[str], list[list[float]]]:
    """The previous score_labels: every (row, label) pair as its own packed example."""
    labels = params.prepare.labels
    nll, _ = example_nll(model, tok, [r | {"label": lab} for r in rows for lab in labels], params)
    L = len(labels)
    logp = [[-nll[i * L + j] for j in range(L)] for i in range(len(rows))]
    return [labels[max(range(L), key=lambda j: lp[j])] for lp in logp], logp


def bench(args) -> dict:
    params = recipes.build("emotion", [f"model.name={args.model}", f"prepare.n_test={args.n}"])
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        write_splits(params, Path(tmp))
        rows = read_split("test", Path(tmp))
    tok, model = load_tokenizer(args.model), load_model(args.model)  # fp32 weights, CPU
    task, labels = tasks.TASKS[params.prepare.task], params.prepare.labels
    ids, spans = encode_batch(tok, [r | {"label": lab} for r in rows for lab in labels], task, labels)
    plens = [trained[0][0] for trained in spans]  # each pair's prompt: the tokens before its answer
    print(f"[bench] {len(rows)} rows x {len(labels)} labels, {torch.get_num_threads()} torch threads", flush=True)
    prompts, _ = prompts_and_targets(task, rows, labels)
    branches, _ = answer_branches(tok, rows, task, labels)
    L = len(labels)

    def cached(n: int) -> tuple[list[str], list[list[float]]]:
        with contextlib.redirect_stdout(io.StringIO()):
            _, logp, _ = answer(model, tok, prompts[:n], 0, params.evaluate.batch_size, branches=branches[:n])
        return [labels[max(range(L), key=lp.__getitem__)] for lp in logp], logp

    cached(2)  # warm-up, not timed
    pairs(model, tok, rows[:2], params)
    t = time.perf_counter()
    old, old_lp = pairs(model, tok, rows, params)
    t_pairs = time.perf_counter() - t
    t = time.perf_counter()
    new, new_lp = cached(len(rows))
    t_cached = time.perf_counter() - t
    gap = max(abs(a - b) for x, y in zip(old_lp, new_lp) for a, b in zip(x, y))
    return {
        "model": args.model,
        "rows": len(rows),
        "labels": len(labels),
        "machine": machine(),
        "pair_tokens": sum(len(x) for x in ids),
        "cached_tokens": sum(plens[i * L] + sum(map(len, bs)) for i, bs in enumerate(branches)),
        "pairs_wall_s": t_pairs,
        "cached_wall_s": t_cached,
        "ratio": t_pairs / t_cached,
        "picks_identical": sum(a == b for a, b in zip(old, new)),
        "max_abs_logprob_diff": gap,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model.name (tiny-gpt2 for a quick check)")
    ap.add_argument("--n", type=int, default=200, help="test rows")
    ap.add_argument("--out", default=str(HERE / "results" / "label_scoring.json"))
    args = ap.parse_args()
    r = bench(args)
    print(
        f"{r['model']}, {r['rows']} emotion rows x {r['labels']} labels, fp32, {r['machine']['cpu']}\n"
        f"| | pairs (each alone) | cached (now) |\n|---|---|---|\n"
        f"| tokens through the model | {r['pair_tokens']:,} | {r['cached_tokens']:,} |\n"
        f"| wall seconds | {r['pairs_wall_s']:.1f} | {r['cached_wall_s']:.1f} |\n\n"
        f"speed-up **{r['ratio']:.2f}x**; identical picks {r['picks_identical']}/{r['rows']}; "
        f"largest log-prob difference {r['max_abs_logprob_diff']:.2e}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=2) + "\n")
    print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
