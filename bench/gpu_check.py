"""The GPU check (issue #18): one table of what tuneline's GPU path does, on one H100/H200.

Rows, each measured by the product itself in a fresh copy of the project in a temporary
folder (the user's params.yaml, data, models and registry are never touched):
1. `scratch`: GPT-2 124M (`gpt2-scratch-small`), full training on `concat` data at T=1024
   in bf16 (the pretrain recipe). The prepare, tokenize and train stages run as dvc.yaml
   runs them (`python -m tuneline.stages NAME`); tokens/s and MFU are the train stage's
   own figures (metrics/train.json: optimizer steps only, validation and saving excluded).
   Every row is one example: no mask, so sdpa takes its causal flash path.
2. `default job train`: the default job's training (SmolLM2-135M, LoRA, bfd-packed rows),
   with flex attention over the packed examples (tuneline/attention.py): tokens/s and MFU.
3. `default job end to end`: `tuneline run` of the default job (params.yaml as shipped):
   wall time, chrF of the tuned and of the base model, and each stage's time.
Rows 2 and 3 come from the same run.
4. `default job, QLoRA nf4` (issue #20): the same project run again with
   `train.quantize=nf4` (bitsandbytes; on CUDA only): tokens/s, MFU, wall time of the rerun
   (train, validate, the tuned model's evaluation, register with its merge parity), chrF and
   the best validation loss beside LoRA's.

Run (from the project root, with the project installed: `make install`):
    bash bench/gpu_check.sh           # on a GPU: the real sizes (about 5-8 minutes)
    bash bench/gpu_check.sh --tiny    # tiny models and slices: checks the harness on a CPU
Prints the table and writes bench/results/gpu_check.json (or --out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("tuneline", "components", "flows", "recipes", "dvc.yaml", "params.yaml")

# GPT-2 124M at GPT-2's context, bf16, full training (llm.c's setting is B=64 x T=1024;
# 16 x 1024 tokens per step keeps to one H100's memory without checkpointing).
SCRATCH = [
    "model.name=gpt2-scratch-small",
    "tokenize.max_length=1024",
    "train.precision=bf16",
    "train.batch_size=16",
    "train.max_steps=40",
    "train.eval_every=1000",
    "train.log_every=10",
]
# QLoRA over the default job (issue #20): bitsandbytes' 4-bit kernels need CUDA.
QLORA = "train.quantize=nf4"
# The same rows, on tiny models and slices: what the CPU test runs.
TINY_SCRATCH = [
    "model.name=gpt2-scratch-tiny",
    "tokenize.max_length=64",
    "prepare.n_train=64",
    "prepare.n_val=8",
    "prepare.n_test=8",
    "train.batch_size=4",
    "train.max_steps=3",
    "train.eval_every=1000",
]
TINY_DEFAULT = [
    "model.name=tiny-gpt2",
    "prepare.n_train=48",
    "prepare.n_val=8",
    "prepare.n_test=4",
    "tokenize.max_length=128",
    "train.max_steps=3",
    "train.eval_every=3",
    "evaluate.batch_size=4",
]


def project(where: Path, recipe: str, sets: list[str]) -> Path:
    """A fresh tuneline project (git + DVC repo) in `where`, with the recipe and overrides
    written to its params.yaml, as `tuneline run --recipe` writes them."""
    from tuneline import recipes

    where.mkdir(parents=True)
    for item in PROJECT_FILES:
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(
            src, where / item, **({} if src.is_file() else {"ignore": shutil.ignore_patterns("__pycache__")})
        )
    params = recipes.build(recipe, sets)
    (where / "params.yaml").write_text(
        recipes.dump(params, f"gpu_check: recipe {recipe}, {' '.join(sets) or 'as shipped'}")
    )
    # A machine without git (a device image may have none) gets a DVC project without SCM:
    # `tuneline run` works there, only its DVC experiment is not saved.
    git = shutil.which("git") is not None
    cmds = [["git", "init", "-q"]] if git else []
    cmds.append([sys.executable, "-m", "dvc", "init", "-q", *([] if git else ["--no-scm"])])
    for cmd in cmds:
        subprocess.run(cmd, cwd=where, check=True, capture_output=True)
    return where


def env_for(root: Path) -> dict[str, str]:
    """The environment a user's shell gives a run in `root`: its own MLflow store and Prefect
    home (tuneline defaults them inside the project); the model cache is shared."""
    keep = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_HOME", "TUNELINE_ROOT")}
    # The project's own code first; then what was on the path (a device kit's packages).
    path = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    return keep | {"PYTHONPATH": path, "TUNELINE_CACHE": os.environ.get("TUNELINE_CACHE", str(ROOT / ".cache"))}


def run(cmd: list[str], root: Path, what: str, timeout: int) -> tuple[str, float]:
    """Run `cmd` in `root`, echoing its output; (output, wall seconds). A failure stops the check."""
    print(f"[gpu_check] {what}: {' '.join(cmd[1:] if cmd[0] == sys.executable else cmd)}", flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=root, env=env_for(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[") or "error" in line.lower():
            print("    " + line.rstrip(), flush=True)
    code = proc.wait(timeout=timeout)
    out = "".join(lines)
    if code:
        sys.exit(f"[gpu_check] {what} failed (exit {code}):\n{out[-3000:]}")
    return out, time.perf_counter() - t


def train_figures(root: Path) -> dict:
    """tokens/s, MFU and what they were measured on, from a finished train stage."""
    m = json.loads((root / "metrics" / "train.json").read_text())
    return {
        k: m.get(k)
        for k in ("tokens_per_s", "mfu", "precision", "device", "steps", "train_s", "peak_memory_mb", "best_val_loss")
    }


def end_to_end_figures(root: Path, out: str, wall: float) -> dict:
    """Wall time, the primary metric of both models and each stage's time, from a finished `tuneline run`."""
    ev = json.loads((root / "metrics" / "eval.json").read_text())
    metric = ev["primary_metric"]
    stages = {name: float(s) for name, s in re.findall(r"^\[(\w+)\] done in ([\d.]+)s", out, re.M)}
    return {
        "wall_s": wall,
        "metric": metric,
        "tuned": ev["tuned"][metric],
        "base": ev["base"][metric],
        "generation_s": ev["tuned"].get("generation_s"),
        "stage_s": stages,
    }


def scratch_row(work: Path, tiny: bool) -> dict:
    root = project(work / "scratch", "pretrain", TINY_SCRATCH if tiny else SCRATCH)
    for stage in ("prepare", "tokenize", "train"):
        run([sys.executable, "-m", "tuneline.stages", stage], root, f"scratch {stage}", 1800)
    return train_figures(root)


def default_job_rows(work: Path, tiny: bool) -> tuple[dict, dict]:
    root = project(work / "default", "descramble", TINY_DEFAULT if tiny else [])
    out, wall = run([sys.executable, "-m", "tuneline.cli", "run"], root, "default job", 3600)
    return train_figures(root), end_to_end_figures(root, out, wall)


def qlora_row(work: Path) -> dict:
    """The default job again with QLoRA (train.quantize=nf4), in the project the default-job
    rows left: prepare and tokenize are reused, the base model's scores come from the cache,
    so this re-runs train, validate, the tuned model's evaluation and register (merged into
    the full-precision base, with the merge-parity check). Only on CUDA, with bitsandbytes."""
    root = work / "default"
    out, wall = run([sys.executable, "-m", "tuneline.cli", "run", "--set", QLORA], root, "QLoRA", 3600)
    parity = re.findall(r"^\[register\] merge parity.*$", out, re.M)
    return train_figures(root) | end_to_end_figures(root, out, wall) | {"parity": parity[-1] if parity else None}


def table(res: dict) -> str:
    """The rows that were run (`--rows` may leave some out)."""

    def trained(what: str, f: dict, wall: str, result: str) -> tuple:
        mfu = "n/a" if f["mfu"] is None else f"{100 * f['mfu']:.1f} %"
        return (what, f"{f['tokens_per_s']:,.0f}", mfu, wall, result)

    rows = [("what", "tokens/s", "MFU", "wall", "result")]
    if s := res.get("scratch"):
        what = f"{res['scratch_model']} full, concat T={res['scratch_T']}, {s['precision']}"
        rows.append(
            trained(what, s, f"{s['train_s']:.0f} s train", f"{s['steps']} steps, peak {s['peak_memory_mb']:,.0f} MB")
        )
    if t := res.get("default_train"):
        e = res["default_end_to_end"]
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in e["stage_s"].items())
        result = f"{t['steps']} steps, best val loss {t['best_val_loss']:.4f}"
        rows.append(trained(f"default job train ({t['precision']})", t, f"{t['train_s']:.0f} s train", result))
        result = f"{e['metric']} {e['tuned']:.2f} (base {e['base']:.2f}); {stages}"
        rows.append(("default job end to end", "", "", f"{e['wall_s']:.0f} s", result))
    if q := res.get("qlora"):  # wall: the rerun (train, validate, the tuned model's evaluation, register)
        result = f"{q['metric']} {q['tuned']:.2f}, best val loss {q['best_val_loss']:.4f}, peak {q['peak_memory_mb']:,.0f} MB"
        rows.append(trained(f"default job, QLoRA nf4 ({q['precision']})", q, f"{q['wall_s']:.0f} s", result))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    device = (res.get("scratch") or res["default_train"])["device"]
    return f"device: {device}\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models and slices (a CPU check of the harness)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    ap.add_argument(
        "--rows",
        choices=("all", "scratch", "default"),
        default="all",
        help="scratch: row 1 only (needs no SmolLM2); default: rows 2 and 3 only",
    )
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("[gpu_check] no CUDA GPU here; --tiny checks the harness on the CPU")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        sets = dict(s.split("=", 1) for s in (TINY_SCRATCH if args.tiny else SCRATCH))
        res = {"scratch_model": sets["model.name"], "scratch_T": int(sets["tokenize.max_length"]), "tiny": args.tiny}
        res["scratch"] = scratch_row(work, args.tiny) if args.rows != "default" else None
        if args.rows != "scratch":
            res["default_train"], res["default_end_to_end"] = default_job_rows(work, args.tiny)
            if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes"):
                print(table(res), flush=True)  # these rows stand whatever the QLoRA run does
                try:
                    res["qlora"] = qlora_row(work)
                except SystemExit as e:  # run() stops the check on a failure: keep the rest
                    res["qlora_error"] = str(e)[-3000:]
            else:
                print("[gpu_check] QLoRA row left out: it needs CUDA and bitsandbytes", flush=True)
    res["total_s"] = time.perf_counter() - t0
    print(table(res))
    print(f"[gpu_check] done in {res['total_s']:.0f} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    if "qlora_error" in res:
        sys.exit(f"[gpu_check] the QLoRA row failed; the other rows are above:\n{res['qlora_error']}")
    return res


if __name__ == "__main__":
    main()
