"""Beam search against greedy decoding for a trained model, on the validation split.

This is the measurement behind the default `evaluate.num_beams: 1`. It uses the project's own
tuned model (models/merged, written by `tuneline run` or `dvc repro validate`), its params,
and the validation rows that the validate stage scores. Each beam count decodes those
rows through `evaluation.evaluate_model`, under the run's `evaluate.constrain`, with the
same model object. Then it scores them with the task's metrics. The test split is never
read: what this shows may be used to choose `evaluate.num_beams`.

Timing: an untimed warm-up, then each beam count in turn in one process. Seconds are also
given as a ratio to greedy, which is the figure that holds on a shared machine.

Run (from a project root, after the validate stage):
    python bench/beams.py                 # 1, 2, 4 and 8 beams
    python bench/beams.py --beams 1 4
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

from tuneline import ROOT  # noqa: E402
from tuneline.config import load_params  # noqa: E402
from tuneline.data import MERGED  # noqa: E402
from tuneline.evaluation import evaluate_model, metrics_of, test_rows  # noqa: E402
from tuneline.modeling import load_model, load_tokenizer  # noqa: E402


def bench(beams: list[int]) -> dict:
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
    ap.add_argument("--out", type=Path, default=HERE / "results" / "beams.json")
    args = ap.parse_args()
    result = bench(args.beams)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
