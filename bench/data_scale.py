"""Flat memory at scale: prepare, tokenize and 20 train steps of the pretrain recipe on
corpora of growing size; peak RSS and wall time per million tokens, per stage.

The corpora are real sentences, recombined: every sentence of the Wikipedia sample in the
gensim wheel, the alpaca outputs and the emotion tweets in ../shared/data (when present),
drawn with a seeded RNG into paragraphs of 3-9 sentences, so that every paragraph is new
text. Each corpus is a plain .txt file (paragraphs separated by blank lines), read as
`prepare.source=<file>`, the way a user brings a corpus.

Each stage runs in its own process (the stage's `run`, as dvc repro runs it); its peak RSS
is that process's maximum resident set (os.wait4), so stages never mix. Run:

    python bench/data_scale.py --sizes 20,100,500      # million tokens; ~1 h for these
    python bench/data_scale.py --sizes 2,8 --keep      # a quick look

The figures go to bench/results/data_scale.json and print as a table with the ratios of the
largest corpus to the smallest (goal: peak RSS of every stage <= 3 GB, within 1.3x across
sizes; wall time per token within 1.3x).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CHARS_PER_TOKEN = 4.4  # GPT-2 BPE on English prose; the real count comes from tokenize
STAGES = ("prepare", "tokenize", "train")


def sentence_pool() -> list[str]:
    """Distinct real sentences from the text the project has offline."""
    sys.path.insert(0, str(ROOT))
    from tuneline import sources, tasks

    batches, _, _ = sources.load("builtin:wikipedia")
    pool = tasks.clean_sentences((r["text"] for b in batches for r in b), 4, 60)
    split = re.compile(r"(?<=[.!?])\s+")
    alpaca = SHARED / "alpaca" / "alpaca_data.json"
    if alpaca.is_file():
        for r in json.loads(alpaca.read_text()):
            pool += [s for s in split.split(" ".join(r["output"].split())) if len(s.split()) >= 4]
    for name in ("train.jsonl", "validation.jsonl"):
        path = SHARED / "emotion" / name
        if path.is_file():
            pool += [json.loads(line)["text"].capitalize() + "." for line in path.open()]
    return sorted(set(pool))


def build_corpus(path: Path, tokens: int, pool: list[str], seed: int = 0) -> int:
    """Write paragraphs of 3-9 random pool sentences until ~`tokens` tokens; returns bytes."""
    rng = random.Random(seed)
    target = int(tokens * CHARS_PER_TOKEN)
    written = 0
    with open(path, "w") as f:
        while written < target:
            block = "\n\n".join(" ".join(rng.choices(pool, k=rng.randint(3, 9))) for _ in range(10_000))
            f.write(block + "\n\n")
            written += len(block) + 2
    return path.stat().st_size


def run_stage(stage: str, params: dict, cwd: Path) -> dict:
    """One stage in its own process: wall seconds and peak RSS (GB) of that process."""
    code = (
        "import json, sys\n"
        "from tuneline.params_file import parse_params\n"
        f"from components import {stage} as stage\n"
        "stage.run(parse_params(json.loads(sys.argv[1])))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(params)], cwd=cwd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{stage} failed in {cwd}")
    return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 2**20}


def bench_size(size_m: float, pool: list[str], work: Path) -> dict:
    here = work / f"{size_m:g}M"
    shutil.rmtree(here, ignore_errors=True)
    here.mkdir(parents=True)
    corpus = here / "corpus.txt"
    t = time.perf_counter()
    nbytes = build_corpus(corpus, int(size_m * 1e6), pool)
    print(f"[data_scale] {size_m:g}M: corpus {nbytes / 1e6:.0f} MB built in {time.perf_counter() - t:.0f}s", flush=True)
    sys.path.insert(0, str(ROOT))
    from tuneline import recipes

    params = recipes.build("pretrain", [f"prepare.source={corpus}", "train.max_steps=20", "train.eval_every=20"])
    out = {"target_tokens_m": size_m, "corpus_mb": nbytes / 1e6}
    for stage in STAGES:
        out[stage] = run_stage(stage, params.model_dump(), here)
        print(f"[data_scale] {size_m:g}M {stage}: {out[stage]}", flush=True)
    tok = json.loads((here / "metrics/tokenize.json").read_text())
    prep = json.loads((here / "metrics/prepare.json").read_text())
    meta = json.loads((here / "data/tokenized/meta.json").read_text())
    out["tokens_m"] = sum(s["tokens"] for s in meta["splits"].values()) / 1e6
    out["paragraphs"] = prep["source_rows"]
    out["train_blocks"] = tok["train"]["sequences"]
    for stage in ("prepare", "tokenize"):
        out[stage]["s_per_m_tokens"] = out[stage]["wall_s"] / out["tokens_m"]
    out["disk_mb"] = {
        d: sum(p.stat().st_size for p in (here / "data" / d).iterdir()) / 1e6 for d in ("prepared", "tokenized")
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20,100,500", help="corpus sizes in million tokens")
    ap.add_argument("--work", default="/tmp/tuneline-data-scale")
    ap.add_argument("--keep", action="store_true", help="keep the corpora and stage outputs")
    ap.add_argument("--out", default=str(ROOT / "bench/results/data_scale.json"))
    args = ap.parse_args()
    work = Path(args.work)
    pool = sentence_pool()
    print(f"[data_scale] {len(pool):,} distinct sentences in the pool", flush=True)
    results = []
    for size in [float(s) for s in args.sizes.split(",")]:
        results.append(bench_size(size, pool, work))
        if not args.keep:
            shutil.rmtree(work / f"{size:g}M", ignore_errors=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("| corpus | tokens | stage | wall s | s per M tokens | peak RSS GB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for stage in STAGES:
            s = r[stage]
            per = f"{s['s_per_m_tokens']:.2f}" if "s_per_m_tokens" in s else "(20 steps)"
            print(
                f"| {r['corpus_mb']:.0f} MB | {r['tokens_m']:.1f} M | {stage} | {s['wall_s']:.0f} | {per} | "
                f"{s['peak_rss_gb']:.2f} |"
            )
    small, large = results[0], results[-1]
    for stage in STAGES:
        rss = large[stage]["peak_rss_gb"] / small[stage]["peak_rss_gb"]
        line = f"{stage}: peak RSS largest/smallest {rss:.2f}x"
        if "s_per_m_tokens" in large[stage]:
            line += f", time per token largest/smallest {large[stage]['s_per_m_tokens'] / small[stage]['s_per_m_tokens']:.2f}x"
        print(line)


if __name__ == "__main__":
    main()
