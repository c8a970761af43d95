"""LoRA variants on the default job (issue #20): LoRA, DoRA, rsLoRA and LoRA+ side by side.

Each variant is the project's params.yaml with one switch, trained and evaluated by the
pipeline's own stages (`dvc repro evaluate`: prepare and tokenize are reused, and the base
model's evaluation is cached after the first), one after another in one run:
- lora: params.yaml as it is (no work when the project has just run it);
- dora: train.lora_variant=dora;
- rslora: train.lora_variant=rslora;
- lora+: train.loraplus_lr_ratio=16 with train.lr halved, as LoRA+'s paper and peft advise
  (a 16x rate for the B matrices, a lower base rate).
Per variant: the best validation loss (what a choice between them rests on), the tuned
model's test chrF, exact match, BLEU and multiset rate, train seconds and tokens/s, and
trainable parameters. params.yaml is restored at the end, whatever happens.

Run from a project that ran the default job (`make run`):
    python bench/lora_variants.py                 # all four
    python bench/lora_variants.py --only dora     # some
Results: bench/results/lora_variants.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_vs_seed import machine  # noqa: E402

from tuneline import recipes  # noqa: E402
from tuneline.params_file import load_params, parse_params  # noqa: E402


def variants(lr: float) -> dict[str, list[str]]:
    return {
        "lora": [],
        "dora": ["train.lora_variant=dora"],
        "rslora": ["train.lora_variant=rslora"],
        "lora+": ["train.loraplus_lr_ratio=16", f"train.lr={lr / 2}"],
    }


def run_variant(sets: list[str], original: str) -> dict:
    params = load_params("params.yaml")
    if sets:
        params = parse_params(recipes.merge(params.model_dump(), recipes.parse_set(sets)), "--set")
    Path("params.yaml").write_text(recipes.dump(params, original.splitlines()[0].lstrip("# ")) + "\n")
    subprocess.run([sys.executable, "-m", "dvc", "repro", "evaluate"], check=True)
    train = json.loads(Path("metrics/train.json").read_text())
    tuned = json.loads(Path("metrics/eval.json").read_text())["tuned"]
    return {
        "sets": sets,
        "best_val_loss": train["best_val_loss"],
        "train_s": train["train_s"],
        "tokens_per_s": train["tokens_per_s"],
        "trainable_params": train["trainable_params"],
        **{k: tuned[k] for k in ("chrf", "exact_match", "bleu", "multiset_rate", "perplexity")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated variants (default: all)")
    args = ap.parse_args()
    original = Path("params.yaml").read_text()
    chosen = variants(load_params("params.yaml").train.lr)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    results = {}
    try:
        for name, sets in chosen.items():
            print(f"[bench] {name}: {' '.join(sets) or 'params.yaml as it is'}", flush=True)
            results[name] = run_variant(sets, original)
    finally:
        Path("params.yaml").write_text(original)
    print(
        f"\n{'variant':<8} {'val loss':>9} {'chrF':>6} {'exact':>6} {'BLEU':>6} {'multiset':>8} {'train s':>8} {'tok/s':>6}"
    )
    for name, r in results.items():
        print(
            f"{name:<8} {r['best_val_loss']:>9.4f} {r['chrf']:>6.2f} {r['exact_match']:>6.3f} {r['bleu']:>6.2f} "
            f"{r['multiset_rate']:>8.3f} {r['train_s']:>8.1f} {r['tokens_per_s']:>6.0f}"
        )
    out = HERE / "results" / "lora_variants.json"
    out.write_text(json.dumps({"machine": machine(), "variants": results}, indent=2) + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
