"""The near-duplicate audit at corpus scale: prepare on 1 M rows with and without it.

The rows are descramble sentences of 8-30 words drawn from the word frequencies of the
Wikipedia sample's sentences (so unrelated rows share function words as real ones do),
plus `--inject` near duplicates of test rows (one word changed). Prepare runs as the
stage does (validate, de-duplicate, split, audit, write Parquet) with n_train 0, so every
row but the 300 val/test ones is checked. Each variant runs in its own process, twice,
alternating; the audit's own time, prepare's time and peak RSS are reported, and whether
the injected near duplicates were all found.

Run: `python bench/neardup_scale.py` (about 8 min on 2 cores; `--rows` to change the size).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def corpus(path: Path, n: int, inject: int, seed: int = 0) -> None:
    """n sentences from the sample's word frequencies; the last `inject` are near duplicates
    (one word changed) of earlier ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tuneline import recipes
    from tuneline.rows import task_source

    params = recipes.build("descramble")
    rows, _ = task_source("builtin:wikipedia", params.prepare, "bench")
    words = Counter(w for b in rows for r in b for w in re.findall(r"[a-z]+", r["target"].lower()))
    vocab, weights = zip(*words.items())
    cum = list(itertools.accumulate(weights))  # once: choices() would sum the weights per call
    rng = random.Random(seed)
    out = []
    for _ in range(n - inject):
        k = rng.randint(8, 30)
        s = " ".join(rng.choices(vocab, cum_weights=cum, k=k))
        out.append(s[0].upper() + s[1:] + ".")
    # The val/test rows are the lowest seeded ranks of the examples' digests (splits.py):
    # inject near duplicates of those, as a leak would be.
    import numpy as np

    from tuneline import splits, tasks

    digests = np.array([splits.digest({"target": s}, tasks.TASKS["descramble"]) for s in out], dtype=np.uint64)
    held_out = np.argsort(splits.ranks(digests, params.seed), kind="stable")[:300]
    for i in held_out[:inject].tolist():  # one word of a val/test sentence changed
        w = out[i].split()
        w[len(w) // 2] = "zebra"
        out.append(" ".join(w))
    pq.write_table(pa.table({"target": out}), path, row_group_size=50_000)


def one(data: Path, audit: bool, inject: int) -> dict:
    """prepare in this process (a child of main): its time, the audit's line, peak RSS."""
    from tuneline import splits
    from tuneline.params_file import parse_params

    cfg = {
        "source": str(data),
        "n_train": 0,
        "n_val": 100,
        "n_test": 200,
        "max_words": 40,
        "on_overlap": "report",
        "near_dup_threshold": 0.5 if audit else None,
    }
    import pyarrow.parquet as pq

    params = parse_params({"prepare": cfg})
    with tempfile.TemporaryDirectory() as out:
        t = time.time()
        m = splits.write_splits(params, Path(out))
        seconds = time.time() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        # An injected row may itself be drawn into val/test; those in train are the leaks.
        injected = set(pq.read_table(data).column("target").to_pylist()[-inject:]) if inject else set()
        in_train = sum(
            1 for s in pq.read_table(Path(out) / "train.parquet").column("target").to_pylist() if s in injected
        )
    return {
        "seconds": seconds,
        "near_duplicates": m.get("near_duplicates"),
        "injected_in_train": in_train,
        "source_rows": m["source_rows"],
        "peak_rss_gb": peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--inject", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(Path(a.child[0]), a.child[1] == "audit", a.inject)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.parquet"
        t = time.time()
        corpus(data, a.rows, a.inject)
        print(f"corpus: {a.rows:,} rows in {time.time() - t:.0f}s", flush=True)
        runs: dict[str, list[dict]] = {"audit": [], "no_audit": []}
        for r in range(a.repeats):
            for kind in ("audit", "no_audit") if r % 2 == 0 else ("no_audit", "audit"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(data), kind, "--inject", str(a.inject)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                audit_line = [x for x in out.stdout.splitlines() if "near-duplicate audit" in x]
                res = json.loads(out.stdout.strip().splitlines()[-1])
                res["audit_line"] = audit_line[0] if audit_line else None
                runs[kind].append(res)
                print(kind, res, flush=True)
    audit_s = [float(re.search(r"in ([\d.]+)s", r["audit_line"]).group(1)) for r in runs["audit"]]
    result = {
        "rows": a.rows,
        "injected": a.inject,
        "injected_in_train": runs["audit"][0]["injected_in_train"],
        "found": [r["near_duplicates"] for r in runs["audit"]],
        "audit_seconds": audit_s,
        "prepare_seconds_with_audit": [round(r["seconds"], 1) for r in runs["audit"]],
        "prepare_seconds_without": [round(r["seconds"], 1) for r in runs["no_audit"]],
        "ratio_with_over_without": round(
            sorted(r["seconds"] for r in runs["audit"])[len(runs["audit"]) // 2]
            / sorted(r["seconds"] for r in runs["no_audit"])[len(runs["no_audit"]) // 2],
            2,
        ),
        "peak_rss_gb_with": max(r["peak_rss_gb"] for r in runs["audit"]),
        "peak_rss_gb_without": max(r["peak_rss_gb"] for r in runs["no_audit"]),
    }
    print(json.dumps(result, indent=1))
    (ROOT / "bench/results/neardup_scale.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
