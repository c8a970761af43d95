"""Best-fit-decreasing packing on lengths alone: the bucket/bitset BFD (tuneline.packing.bfd)
against the `bisect.insort` BFD it replaced, side by side, and the 10 M-length goal (<= 60 s).

Lengths are real: the alpaca recipe's examples (instruction + input + output, SmolLM2's
tokenizer, those over 512 tokens left out as tokenize.overlong=drop would), resampled with
replacement to each size. Both algorithms give the same bins (checked at every size the
old one runs); the old one is only timed up to 1.6 M, where it already takes seconds and
grows faster than linear. Run: `python bench/packing.py` (about 2 min).
"""

from __future__ import annotations

import argparse
import bisect
import json
import time
from pathlib import Path

import numpy as np

from tuneline.packing import bfd, groups

ROOT = Path(__file__).resolve().parents[1]
CAPACITY = 512


def old_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """The replaced implementation, verbatim: a sorted Python list of free spaces."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[tuple[int, int]] = []
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            space, b = free.pop(j)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    return bins


def real_lengths() -> np.ndarray:
    from tuneline import recipes, splits, tasks
    from tuneline.modeling import load_tokenizer
    from tuneline.tokenization import encode_batch

    params = recipes.build("alpaca")
    rows, _ = splits.file_rows(params.prepare.source, params)
    ids, _ = encode_batch(load_tokenizer(params.model.name), rows, tasks.TASKS["instruct"], [])
    lengths = np.array([len(x) for x in ids])
    return lengths[lengths <= CAPACITY]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench/results/packing.json"))
    args = ap.parse_args()
    pool = real_lengths()
    rng = np.random.default_rng(0)
    results = []
    for n in (400_000, 1_600_000, 10_000_000):
        lengths = rng.choice(pool, n)
        t = time.perf_counter()
        members, starts = bfd(lengths, CAPACITY)
        new_s = time.perf_counter() - t
        r = {
            "lengths": n,
            "new_s": new_s,
            "bins": len(starts) - 1,
            "fill": float(lengths.sum() / (len(starts) - 1) / CAPACITY),
        }
        if n <= 1_600_000:
            as_list = lengths.tolist()
            t = time.perf_counter()
            old = old_bfd(as_list, CAPACITY)
            r["old_s"] = time.perf_counter() - t
            r["speedup"] = r["old_s"] / new_s
            r["same_bins"] = old == groups(members, starts)
        results.append(r)
        print(json.dumps(r), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("| lengths | old bisect BFD s | new BFD s | speedup | same bins | rows | fill |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        old = f"{r['old_s']:.1f}" if "old_s" in r else "-"
        sp = f"{r['speedup']:.1f}x" if "speedup" in r else "-"
        print(
            f"| {r['lengths']:,} | {old} | {r['new_s']:.1f} | {sp} | {r.get('same_bins', '-')} | {r['bins']:,} | "
            f"{r['fill']:.1%} |"
        )


if __name__ == "__main__":
    main()
