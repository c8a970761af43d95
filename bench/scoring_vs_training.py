"""Perplexity scoring against training, per token, on the same packed rows (issue #18: scoring
must be at least as fast per token as the forward pass of training).

Same model (SmolLM2-135M by default, all weights trainable as in full fine-tuning), same
bfd-packed 512-token rows of random-token examples (40-70 tokens, the first 20 of each a
prompt), same precision, in one process, alternating:
- scoring: `tuneline.loss.example_totals`, what evaluate runs (SCORE_BATCH rows per forward,
  per-example answer-token sums), in eval mode without gradients;
- training: `tuneline.loss.loss_sum` forward and backward, at the train stage's default
  batch size (2 rows), as one optimizer step's micro-batch does.
Both report tokens (real, not padding) per second. A training step is forward plus
backward (about 3 forward passes of work), so "as fast per token as the forward pass of
training" means a scoring rate of at least 3x the training rate; the ratio is printed.

Run (from the project root):
    python bench/scoring_vs_training.py                   # smollm2, bf16 where the CPU has it
    python bench/scoring_vs_training.py --model tiny-gpt2 # quick check of the harness
Results: bench/results/scoring_vs_training.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TUNELINE_ROOT", str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from train_vs_seed import machine  # noqa: E402

from tuneline.evaluation import SCORE_BATCH  # noqa: E402
from tuneline.hardware import amp_dtype, autocast  # noqa: E402
from tuneline.loss import example_totals, loss_sum  # noqa: E402
from tuneline.modeling import load_model  # noqa: E402
from tuneline.packing import IGNORE, Example, collate, pack  # noqa: E402


def main() -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default="auto", help="auto (bf16 where supported), bf16 or fp32")
    ap.add_argument("--rows", type=int, default=8, help="packed rows scored and trained on per round")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_model(args.model)
    vocab = model.config.vocab_size
    rng = random.Random(0)
    examples = []
    for _ in range(12 * args.rows):
        ids = [rng.randrange(1, vocab) for _ in range(rng.randint(40, 70))]
        examples.append(Example(ids, [IGNORE] * 20 + ids[20:]))
    rows = pack(examples, 512, "bfd")[: args.rows]
    tokens = sum(len(r["input_ids"]) for r in rows)

    def score() -> float:
        model.eval()
        t = time.perf_counter()
        for i in range(0, len(rows), SCORE_BATCH):
            example_totals(model, rows[i : i + SCORE_BATCH], 0, SCORE_BATCH)
        return tokens / (time.perf_counter() - t)

    def train() -> float:
        model.train()
        t = time.perf_counter()
        for i in range(0, len(rows), 2):
            s, _ = loss_sum(model, collate(rows[i : i + 2], 0))
            s.backward()
        rate = tokens / (time.perf_counter() - t)
        model.zero_grad(set_to_none=True)
        return rate

    with autocast(args.precision):
        score(), train()  # warm-up
        rates = {"score": [], "train": []}
        for _ in range(args.repeats):
            rates["score"].append(score())
            rates["train"].append(train())
    med = {k: statistics.median(v) for k, v in rates.items()}
    res = {
        "model": args.model,
        "precision": str(amp_dtype(args.precision) or torch.float32),
        "machine": machine(),
        "rows": len(rows),
        "tokens": tokens,
        "score_tokens_per_s": med["score"],
        "train_tokens_per_s": med["train"],
        "ratio": med["score"] / med["train"],
        "all": rates,
        "goal_ratio_at_least_3": med["score"] / med["train"] >= 3.0,
    }
    print(
        f"[bench] {args.model}, {res['precision']}, {tokens} tokens in {len(rows)} rows: scoring "
        f"{med['score']:.0f} tok/s, training (fwd+bwd) {med['train']:.0f} tok/s, ratio {res['ratio']:.2f}x"
    )
    out = HERE / "results" / "scoring_vs_training.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
