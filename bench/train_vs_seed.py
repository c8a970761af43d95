"""Training wall time and validation loss: ours against the seed recipe, side by side.

Same model, same N descramble training examples, same validation examples, one epoch:

- seed, reproduced faithfully: the prepared train rows in a `datasets.Dataset`, the per-row
  `dataset.map` of bench/prepare_tokenize.py (`seed_recipe`, imported: every row padded,
  or truncated, to 128 tokens, labels masked to the answer), then `transformers.Trainer`
  (the model's own forward with `labels=`, so logits over all 128 positions of every row);
- ours: `components.train.run` on the packed (best-fit-decreasing, 512-token rows),
  answer-only-loss data that the real prepare and tokenize stages write.

Both start from the default job (recipes/descramble.yaml) with `--n`, `--model`, `--method`
(and any `--set`) on top; epochs is forced to 1 and max_steps to 0. The seed gets the same
values: peak lr, weight decay (both on matrices only, not on biases and norms), warmup
share, max_grad_norm, AdamW betas (0.9, 0.95), the same model preparation and LoRA adapters
(`components.train.prepare_model`: the trained parameters
are identical and initialised from the same torch seed), the same autocast dtype
(`tuneline.hardware.amp_dtype(train.precision)`: bf16 -> `bf16=True`, fp16 -> `fp16=True`),
the same device (CUDA when there is one, else the CPU) and the same seed. Our cosine decays to 10%
of the peak (nanoGPT's min_lr); the seed gets HF's `cosine_with_min_lr` with
`min_lr_rate=0.1`, so the schedules match (`linear` -> `linear`, `constant` ->
`constant_with_warmup`). Warmup is passed as a step count, int(warmup_ratio * steps) like
ours (HF's first warmup step is lr 0, ours lr/warmup: a one-step difference). The seed keeps
HF's default optimizer implementation (fused AdamW, eps 1e-8; ours is torch AdamW, eps
1e-8).

Batch size: one of our optimizer steps holds many examples (a packed row holds ~10). The
seed gets the same number of examples per optimizer step: B_seed = round(N / our steps),
our steps = ceil(epochs * ceil(packed rows / batch_size) / grad_accum); both are printed.

Timing: the seed's `trainer.train()` only (model load, LoRA wrap, dataset map and Trainer
construction excluded). Ours: the whole `components.train.run(params)` call, which also
loads the model, runs one final validation pass (train.eval_every is set huge so it
validates only at the end), writes its checkpoint, merges and saves models/merged and
draws the loss plot: all work the seed's timing leaves out, so the ratio can only
understate our speed-up. run()'s own timer of its optimizer steps alone (metrics `train_s`)
gives a second ratio beside it. With `--repeats` > 1 the two alternate (seed, ours, seed,
ours, ...), checkpoints are cleared before each of our runs (else it would resume at the
last step), and medians are used. With the default single round the seed runs first and
pays the process's one-time warm-ups (seconds, next to minutes of training at the real size).
Timings are only meaningful on an otherwise idle machine.

Validation loss, computed the same way for both: `tuneline.loss.mean_loss` (answer-only,
token-weighted mean cross-entropy) over the tokenized val rows, in fp32 without autocast,
on the CPU; ours from models/merged, the seed from its trained model (LoRA merged).

Work: each side's computed FLOPs for the epoch, from `tuneline.flops.train_flops` of the
same prepared model (LoRA: 4N frozen + 6N adapted per token above the lowest adapter).
Ours: per token x real tokens, the vocabulary projection on answer tokens only, attention
per example (sum of length^2). The seed: every one of its positions (padding included, as
the hardware computes it), the projection at every position (HF's forward computes all
logits), attention over 128 x 128 per row. The wall ratio is then the work ratio times the
ratio of FLOP/s achieved: what is left to gain beyond doing less work is the second.

Data: the real prepare and tokenize stages run in a temporary project directory; both
sides read the same data/prepared train rows (the seed) and their tokenization (ours).

Run (from the project root; the real size takes many minutes on a 2-core CPU):
    python bench/train_vs_seed.py                          # smollm2-135m-instruct, N=1400, LoRA
    python bench/train_vs_seed.py --model tiny-gpt2 --n 64 # quick check of the harness
Results: bench/results/train_vs_seed.json. Goals (GitHub issue): wall time at least 3x
faster, validation loss equal or better.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TUNELINE_ROOT", str(HERE.parent))  # model cache under the project, whatever the cwd
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from prepare_tokenize import SEED_LEN, seed_recipe  # noqa: E402

from components import prepare, tokenize  # noqa: E402
from components import train as train_stage  # noqa: E402
from tuneline import (  # noqa: E402
    data,
    hardware,
    recipes,
    tasks,
    tokendata,
    training,
)
from tuneline.flops import train_flops  # noqa: E402
from tuneline.loss import mean_loss  # noqa: E402
from tuneline.modeling import load_model, load_tokenizer  # noqa: E402
from tuneline.packing import IGNORE  # noqa: E402

HF_SCHEDULE = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}
MIN_LR_RATE = 0.1  # ours: cosine to 10% of the peak (components/train.py lr_at)


@contextmanager
def chdir(path: Path):
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def machine() -> dict:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").is_file()
        else platform.processor()
    )
    import peft
    import transformers

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def trained_tokens(labels_rows) -> int:
    """Answer tokens that enter the loss (position t predicts t+1: labels[1:] not IGNORE)."""
    return sum(sum(1 for t in labels[1:] if t != IGNORE) for labels in labels_rows)


def seed_model(params):
    """The model our train stage would train: same base, same adapters, same init."""
    torch.manual_seed(params.seed)  # as components.train.run: same RNG state before load + wrap
    return training.prepare_model(params)


def fp32_val_loss(model, val_rows, pad_id: int, batch_size: int) -> float:
    model = model.to("cpu").float().eval()
    return mean_loss(model, val_rows, pad_id, batch_size)  # no autocast: fp32


def run_seed(params, seed_ds, b_seed: int, val_rows, pad_id: int, workdir: Path) -> dict:
    from transformers import Trainer, TrainingArguments

    cfg = params.train
    model = seed_model(params)
    dtype = hardware.amp_dtype(cfg.precision)
    steps = math.ceil(cfg.epochs * math.ceil(len(seed_ds) / b_seed))
    schedule = HF_SCHEDULE[cfg.schedule]
    args = TrainingArguments(
        output_dir=str(workdir / "hf_out"),
        per_device_train_batch_size=b_seed,
        gradient_accumulation_steps=1,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        lr_scheduler_type=schedule,
        lr_scheduler_kwargs={"min_lr_rate": MIN_LR_RATE} if schedule == "cosine_with_min_lr" else None,
        warmup_steps=int(cfg.warmup_ratio * steps),  # an int: steps, rounded like ours
        max_grad_norm=cfg.max_grad_norm,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        seed=params.seed,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=cfg.log_every,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=seed_ds)
    t = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t
    model = trainer.model
    if cfg.method == "lora":
        model = model.merge_and_unload()
    val = fp32_val_loss(model, val_rows, pad_id, cfg.batch_size)
    res = {
        "wall_s": wall,
        "steps": out.global_step,
        "mean_train_loss": out.training_loss,
        "val_loss": val,
        "device": str(args.device),
        "precision": str(dtype or torch.float32).removeprefix("torch."),
    }
    del trainer, model
    gc.collect()
    return res


def _mean_train_loss() -> float:
    """Mean of the per-step training losses (what HF's `training_loss` reports)."""
    rows = data.TRAIN_CURVE.read_text().splitlines()[1:]
    return sum(float(r.split(",")[1]) for r in rows) / len(rows)


def run_ours(params, val_rows, pad_id: int) -> dict:
    shutil.rmtree("checkpoints", ignore_errors=True)  # start clean, like the seed
    t = time.perf_counter()
    metrics = train_stage.run(params)
    wall = time.perf_counter() - t
    model = load_model(data.MERGED.resolve())
    val = fp32_val_loss(model, val_rows, pad_id, params.train.batch_size)
    del model
    gc.collect()
    return {
        "wall_s": wall,
        "steps_wall_s": metrics["train_s"],
        "steps": metrics.get("steps"),
        "mean_train_loss": _mean_train_loss(),
        "val_loss": val,
        "run_val_loss_autocast": metrics.get("best_val_loss"),
        "stopped_early": metrics.get("stopped_early"),
        "device": metrics.get("device"),
        "precision": metrics["precision"],
    }


def work(params, train_rows, seed_ds, epochs: float) -> dict:
    """Each side's computed FLOPs for the run (see the module docstring, "Work")."""
    model = seed_model(params)
    per_token, per_trained, per_ctx2 = train_flops(model)
    del model
    gc.collect()
    ours = per_token * sum(len(r["input_ids"]) for r in train_rows)
    ours += per_trained * trained_tokens(r["labels"] for r in train_rows)
    ours += per_ctx2 * sum(n * n for r in train_rows for n in r["seq_lens"])
    seed = (per_token + per_trained) * len(seed_ds) * SEED_LEN + per_ctx2 * len(seed_ds) * SEED_LEN**2
    return {"seed_flops": seed * epochs, "ours_flops": ours * epochs}


def bench(args) -> dict:
    sets = [f"model.name={args.model}", "train.epochs=1", *args.set, "train.max_steps=0", f"train.eval_every={10**9}"]
    if args.n is not None:
        sets.insert(0, f"prepare.n_train={args.n}")
    if args.method:
        sets.insert(0, f"train.method={args.method}")
    params = recipes.build("descramble", sets)
    cfg = params.train
    tok = load_tokenizer(params.model.name)
    pad_id = tok.pad_token_id
    task = tasks.TASKS[params.prepare.task]
    with tempfile.TemporaryDirectory(prefix="train_vs_seed-") as tmp, chdir(Path(tmp)):
        prepare.run(params)
        tokenize.run(params)
        prepared = data.read_split("train")
        train_rows, val_rows = tokendata.read_rows("train"), tokendata.read_rows("val")

        n_examples = sum(len(r["seq_lens"]) for r in train_rows)
        steps_ours = training.total_steps(len(train_rows), cfg)
        b_seed = max(1, round(len(prepared) / steps_ours))
        seed_ds = seed_recipe(prepared, tok, task, params.prepare.labels)
        seed_mask = seed_ds["attention_mask"]
        seed_tokens = sum(sum(m) for m in seed_mask)
        seed_truncated = sum(1 for m in seed_mask if m[-1] == 1)
        sizes = {
            "n_train_examples_seed": len(prepared),
            "n_train_examples_ours": n_examples,
            "n_val_examples": sum(len(r["seq_lens"]) for r in val_rows),
            "ours_packed_rows": len(train_rows),
            "ours_batch_size": cfg.batch_size,
            "ours_grad_accum": cfg.grad_accum,
            "ours_steps_planned": steps_ours,
            "ours_examples_per_step": n_examples / steps_ours,
            "seed_batch_size": b_seed,
            "seed_steps_planned": math.ceil(len(prepared) / b_seed),
            "seed_tokens_nonpad": int(seed_tokens * cfg.epochs),
            "seed_positions": int(len(seed_ds) * SEED_LEN * cfg.epochs),
            "seed_rows_at_128_possibly_truncated": seed_truncated,
            "ours_tokens_nonpad": int(sum(len(r["input_ids"]) for r in train_rows) * cfg.epochs),
            "seed_trained_answer_tokens": trained_tokens(seed_ds["labels"]),
            "ours_trained_answer_tokens": trained_tokens(r["labels"] for r in train_rows),
        }
        sizes |= work(params, train_rows, seed_ds, cfg.epochs)
        print(
            f"[bench] {n_examples} examples -> {len(train_rows)} packed rows: ours {steps_ours} steps x "
            f"{cfg.grad_accum} x {cfg.batch_size} rows ({n_examples / steps_ours:.1f} examples/step); "
            f"seed batch {b_seed} rows of {SEED_LEN} ({sizes['seed_steps_planned']} steps)",
            flush=True,
        )

        seed_runs, our_runs = [], []
        for i in range(args.repeats):
            print(f"[bench] round {i + 1}/{args.repeats}: seed (HF Trainer, pad-to-{SEED_LEN})", flush=True)
            seed_runs.append(run_seed(params, seed_ds, b_seed, val_rows, pad_id, Path(tmp)))
            print(f"[bench] round {i + 1}/{args.repeats}: ours (components.train.run, packed)", flush=True)
            our_runs.append(run_ours(params, val_rows, pad_id))

    def summary(runs: list[dict]) -> dict:
        return {
            **runs[-1],
            "wall_s": statistics.median(r["wall_s"] for r in runs),
            "wall_s_all": [r["wall_s"] for r in runs],
            "val_loss_all": [r["val_loss"] for r in runs],
        }

    seed, ours = summary(seed_runs), summary(our_runs)
    ratio = seed["wall_s"] / ours["wall_s"]
    loop = [r["steps_wall_s"] for r in our_runs if r.get("steps_wall_s")]
    seed["flop_per_s"] = sizes["seed_flops"] / seed["wall_s"]
    ours["flop_per_s"] = sizes["ours_flops"] / statistics.median(loop) if loop else None
    return {
        "model": params.model.name,
        "method": cfg.method,
        "repeats": args.repeats,
        "machine": machine(),
        "sizes": sizes,
        "seed": seed,
        "ours": ours,
        "wall_ratio": ratio,
        "wall_ratio_vs_our_steps": seed["wall_s"] / statistics.median(loop) if loop else None,
        "work_ratio": sizes["seed_flops"] / sizes["ours_flops"],  # the speed-up at equal FLOP/s
        "flop_per_s_ratio": ours["flop_per_s"] / seed["flop_per_s"] if loop else None,  # ours / seed
        "goals": {
            "wall_ratio_at_least_3x": ratio >= 3.0,
            "ours_val_loss_le_seed": ours["val_loss"] <= seed["val_loss"],
        },
        "params": params.model_dump(),
    }


def table(r: dict) -> str:
    s, o, z = r["seed"], r["ours"], r["sizes"]
    rows = [
        ("device, autocast", f"{s['device']}, {s['precision']}", f"{o['device']}, {o['precision']}"),
        ("wall seconds (timed)", f"{s['wall_s']:.1f}", f"{o['wall_s']:.1f}"),
        ("tokens processed (non-pad)", f"{z['seed_tokens_nonpad']:,}", f"{z['ours_tokens_nonpad']:,}"),
        ("positions computed", f"{z['seed_positions']:,}", "(packed, ~no pad)"),
        ("answer tokens trained", f"{z['seed_trained_answer_tokens']:,}", f"{z['ours_trained_answer_tokens']:,}"),
        ("computed TFLOPs (work)", f"{z['seed_flops'] / 1e12:.3g}", f"{z['ours_flops'] / 1e12:.3g}"),
        (
            "GFLOP/s achieved (ours: its optimizer steps)",
            f"{s['flop_per_s'] / 1e9:.0f}",
            f"{o['flop_per_s'] / 1e9:.0f}" if o.get("flop_per_s") else "-",
        ),
        ("optimizer steps", str(s["steps"]), str(o["steps"])),
        ("examples per step", f"{z['seed_batch_size']}", f"{z['ours_examples_per_step']:.1f}"),
        ("mean train loss over the epoch", f"{s['mean_train_loss']:.4f}", f"{o['mean_train_loss']:.4f}"),
        ("val loss (fp32, same rows)", f"{s['val_loss']:.4f}", f"{o['val_loss']:.4f}"),
    ]
    out = [
        f"{r['model']}, {r['method']}, {z['n_train_examples_seed']} examples, 1 epoch, "
        f"{r['machine']['torch_threads']} torch threads, {r['repeats']} round(s)",
        "",
        "| | seed (HF Trainer, pad 128) | ours (packed, answer-only) |",
        "|---|---|---|",
    ]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    g = r["goals"]
    loop = (
        f" (vs our optimizer steps alone, run()'s train_s {o['steps_wall_s']:.1f} s: "
        f"{r['wall_ratio_vs_our_steps']:.2f}x)"
        if r["wall_ratio_vs_our_steps"]
        else ""
    )
    out += [
        "",
        f"wall time ratio seed/ours: **{r['wall_ratio']:.2f}x**{loop}",
        f"work ratio seed/ours: {r['work_ratio']:.2f}x (the speed-up if both ran at the same FLOP/s); "
        + (f"FLOP/s ours/seed: {r['flop_per_s_ratio']:.2f}" if r["flop_per_s_ratio"] else ""),
        f"goal >= 3x faster: {'met' if g['wall_ratio_at_least_3x'] else 'NOT met'}; "
        f"goal val loss ours <= seed ({o['val_loss']:.4f} vs {s['val_loss']:.4f}): "
        f"{'met' if g['ours_val_loss_le_seed'] else 'NOT met'}",
    ]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--n", type=int, default=None, help="training examples (default: the default job's prepare.n_train)"
    )
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model.name (tiny-gpt2 for a quick check)")
    ap.add_argument(
        "--method", choices=["lora", "full"], default=None, help="train.method (default: the default job's)"
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more params overrides, both sides")
    ap.add_argument("--repeats", type=int, default=1, help="alternating seed/ours rounds; medians reported")
    ap.add_argument("--out", default=str(HERE / "results" / "train_vs_seed.json"))
    args = ap.parse_args()
    result = bench(args)
    print(table(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
