"""Batched greedy generation (the evaluate stage's) against one-at-a-time generation, over
the same test prompts.

Both sides generate for the same N descramble test prompts (`splits.write_splits` with
prepare.n_test=N, rendered by `tasks.render`), with the same model object, precision and
max_new_tokens (as `evaluate_model`: longest reference answer in tokens + 8, capped at
evaluate.max_new_tokens), and cut each output at its first newline as evaluate does:
- one-at-a-time: a plain `model.generate` loop, one prompt per call (no padding, KV cache,
  greedy, stop at EOS): what a user writes, and what the issue measured 7.05x against;
- batched: `tuneline.generation.generate` (prompts sorted by length, left padding, KV
  cache, finished rows leave the batch, rows stop at the end of their answer line, and
  prompt-lookup guesses verified in the same forward: `generation.decode`).

Precision: fp32 for both by default. Identical outputs need identical numerics; bf16
autocast rounds differently for different batch shapes, so greedy argmaxes can flip
(`--precision bf16`: both sides under bf16 autocast, information only).
Checked per prompt: decoded outputs must be identical, and the batched token ids (before
EOS) must be the first ones the baseline generated; differing cases are printed. The
untrained base SmolLM2 is fair to time: answer lengths depend on the model and both modes
generate the same tokens. Timing: an untimed warm-up, then both side by side in one
process (`--repeats` > 1: alternating, medians); on a shared machine the ratio is the figure.

Run (from the project root):
    python bench/generate_batched.py                           # smollm2-135m-instruct, N=256
    python bench/generate_batched.py --model tiny-gpt2 --n 16  # quick check of the harness
Results: bench/results/generate_batched.json. Goal (issue #18): identical outputs, >= 15x faster.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TUNELINE_ROOT", str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from train_vs_seed import machine  # noqa: E402

from tuneline import generation, recipes, tasks  # noqa: E402
from tuneline.data import read_split  # noqa: E402
from tuneline.generation import generate  # noqa: E402
from tuneline.hardware import autocast  # noqa: E402
from tuneline.modeling import load_model, load_tokenizer  # noqa: E402
from tuneline.splits import write_splits  # noqa: E402


def one_at_a_time(model, tok, prompts, max_new: int, precision: str) -> dict:
    """The baseline: a plain `model.generate` loop, one prompt at a time (no padding, KV
    cache, greedy, stop at EOS), each output cut at its first newline as evaluate cuts it."""
    outs, token_ids = [], []
    with autocast(precision), torch.no_grad():
        t = time.perf_counter()
        for p in prompts:
            enc = tok(p, return_tensors="pt", add_special_tokens=False)
            row = model.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
                eos_token_id=tok.eos_token_id,
            )[0, enc["input_ids"].shape[1] :].tolist()
            outs.append(tok.decode(row, skip_special_tokens=True).strip().split("\n")[0].strip())
            token_ids.append(row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row)
        wall = time.perf_counter() - t
    return {"wall_s": wall, "outputs": outs, "token_ids": token_ids, "slots": sum(map(len, token_ids))}


def batched(model, tok, prompts, max_new: int, batch_size: int, precision: str, lookup: int = 0) -> dict:
    """`generation.generate` timed; its `decode` wrapped to record each row's new token ids."""
    log = {"slots": 0}
    inner = generation.decode

    def recording(model, state, mask, *args, **kw):
        new = inner(model, state, mask, *args, **kw)
        for ids, m, row in zip(state_ids[-1], mask, new):
            log[tuple(ids[m.bool()].tolist())] = row[: row.index(eos)] if eos in row else row  # before EOS
        log["slots"] += sum(map(len, new))
        return new

    state_ids: list = []
    eos = tok.eos_token_id
    prefill = generation.prefill

    def keep_ids(model, ids, mask, *args, **kw):
        state_ids.append(ids)
        return prefill(model, ids, mask, *args, **kw)

    generation.decode, generation.prefill = recording, keep_ids
    try:
        with autocast(precision), contextlib.redirect_stdout(io.StringIO()):  # generate shows progress
            t = time.perf_counter()
            outs = generate(model, tok, prompts, max_new, batch_size, lookup=lookup)
            wall = time.perf_counter() - t
    finally:
        generation.decode, generation.prefill = inner, prefill
    keys = [tuple(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    return {"wall_s": wall, "outputs": outs, "token_ids": [log[k] for k in keys], "slots": log["slots"]}


def bench(args) -> dict:
    params = recipes.build(
        "descramble", [f"model.name={args.model}", f"prepare.n_test={args.n}", f"evaluate.precision={args.precision}"]
    )
    task, labels = tasks.TASKS[params.prepare.task], params.prepare.labels
    with tempfile.TemporaryDirectory() as tmp:
        write_splits(params, Path(tmp))
        rows = read_split("test", Path(tmp))
    prompts, targets = (list(x) for x in zip(*(tasks.render(task, r, labels) for r in rows)))
    tok, model = load_tokenizer(args.model), load_model(args.model)  # fp32 weights, CPU
    max_new = min(params.evaluate.max_new_tokens, max(len(tok(t)["input_ids"]) for t in targets) + 8)
    print(
        f"[bench] {len(prompts)} prompts, max_new_tokens={max_new}, {args.precision}, "
        f"batch {args.batch_size}, {torch.get_num_threads()} torch threads",
        flush=True,
    )
    one_at_a_time(model, tok, prompts[:2], max_new, args.precision)  # warm-up, not timed
    batched(model, tok, prompts[:2], max_new, 2, args.precision)
    single, many = [], []
    for i in range(args.repeats):
        runs = (
            ("one-at-a-time", single, lambda: one_at_a_time(model, tok, prompts, max_new, args.precision)),
            (
                "batched",
                many,
                lambda: batched(model, tok, prompts, max_new, args.batch_size, args.precision, args.lookup),
            ),
        )
        for name, out, fn in runs:
            out.append(fn())
            print(f"[bench] round {i + 1}: {name} {out[-1]['wall_s']:.1f} s", flush=True)
    s, b = single[-1], many[-1]
    diff = [i for i in range(len(prompts)) if s["outputs"][i] != b["outputs"][i]]
    # batched rows stop at the answer's end (EOS or its newline): their ids must be the
    # baseline's first ones
    diff_ids = [i for i in range(len(prompts)) if s["token_ids"][i][: len(b["token_ids"][i])] != b["token_ids"][i]]
    n_new, n_new_b = [len(t) for t in s["token_ids"]], sum(len(t) for t in b["token_ids"])
    # one-line task: the output is cut at the first newline; tokens up to it (incl.), for scale
    n_line = [next((j + 1 for j, t in enumerate(ids) if "\n" in tok.decode([t])), len(ids)) for ids in s["token_ids"]]
    t_s, t_b = (statistics.median(r["wall_s"] for r in runs) for runs in (single, many))
    return {
        "model": args.model,
        "precision": args.precision,
        "prompts": len(prompts),
        "max_new_tokens": max_new,
        "batch_size": args.batch_size,
        "prompt_lookup": args.lookup,
        "repeats": args.repeats,
        "machine": machine(),
        "device": str(model.device),
        "single_wall_s": t_s,
        "batched_wall_s": t_b,
        "ratio": t_s / t_b,
        "single_wall_s_all": [r["wall_s"] for r in single],
        "batched_wall_s_all": [r["wall_s"] for r in many],
        "outputs_identical": len(prompts) - len(diff),
        "token_ids_identical": len(prompts) - len(diff_ids),
        "new_tokens_single": sum(n_new),
        "new_tokens_batched": n_new_b,
        "mean_new_tokens_single": sum(n_new) / len(n_new),
        "mean_new_tokens_batched": n_new_b / len(n_new),
        "mean_new_tokens_to_first_newline": sum(n_line) / len(n_line),
        "prompts_hitting_max_new_tokens": sum(n == max_new for n in n_new),
        "batched_token_slots": b["slots"],
        "differing": [
            {"i": i, "prompt": prompts[i], "single": s["outputs"][i], "batched": b["outputs"][i]}
            for i in sorted(set(diff) | set(diff_ids))
        ],
        "goals": {"identical": not diff and not diff_ids, "ratio_at_least_15x": t_s / t_b >= 15.0},
    }


def table(r: dict) -> str:
    rows = [
        ("wall seconds", f"{r['single_wall_s']:.1f}", f"{r['batched_wall_s']:.1f}"),
        ("prompts / s", f"{r['prompts'] / r['single_wall_s']:.2f}", f"{r['prompts'] / r['batched_wall_s']:.2f}"),
        ("new tokens (total, before EOS)", f"{r['new_tokens_single']:,}", f"{r['new_tokens_batched']:,}"),
        ("mean new tokens / prompt", f"{r['mean_new_tokens_single']:.1f}", f"{r['mean_new_tokens_batched']:.1f}"),
        ("token slots computed", f"{r['new_tokens_single']:,}", f"{r['batched_token_slots']:,}"),
    ]
    m = r["machine"]
    out = [
        f"{r['model']}, {r['prompts']} descramble test prompts, greedy, max_new_tokens {r['max_new_tokens']}, "
        f"{r['precision']}, {r['device']} ({m['cpu']}), {m['torch_threads']} torch threads, {r['repeats']} round(s)",
        "",
        f"| | one-at-a-time (batch 1) | batched (batch {r['batch_size']}, lookup {r['prompt_lookup']}) |",
        "|---|---|---|",
    ]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    out += [
        "",
        f"speed-up: **{r['ratio']:.2f}x** (goal >= 15x: {'met' if r['goals']['ratio_at_least_15x'] else 'NOT met'})",
        f"identical outputs: {r['outputs_identical']}/{r['prompts']}, identical token ids: "
        f"{r['token_ids_identical']}/{r['prompts']}; {r['prompts_hitting_max_new_tokens']} prompts hit max_new_tokens; "
        f"mean new tokens up to the first newline {r['mean_new_tokens_to_first_newline']:.1f}",
    ]
    for d in r["differing"]:
        out.append(f"DIFFERS #{d['i']}: {d['prompt']!r}\n  single:  {d['single']!r}\n  batched: {d['batched']!r}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model.name (tiny-gpt2 for a quick check)")
    ap.add_argument("--n", type=int, default=256, help="test prompts")
    ap.add_argument("--batch-size", type=int, default=64, help="batched side's batch size")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="both sides; bf16 is info only")
    ap.add_argument("--lookup", type=int, default=0, help="batched side's evaluate.prompt_lookup")
    ap.add_argument("--repeats", type=int, default=1, help="alternating rounds; medians reported")
    ap.add_argument("--out", default=str(HERE / "results" / "generate_batched.json"))
    args = ap.parse_args()
    result = bench(args)
    print(table(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
