"""How tokenize should use the CPUs: the fast tokenizer's Rust threads in one process (what
tokenize does), against one thread, and against `num_proc` worker processes (what
`datasets.map(num_proc=N)` does), on the same texts, side by side, identical ids required.

Texts: paragraphs of the Wikipedia sample and alpaca outputs (the pretrain recipe's kind
of data), in batches of ENCODE_CHUNK, GPT-2's BPE. Run: `python bench/tokenize_parallel.py`.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _texts(n: int) -> list[str]:
    from tuneline import sources

    batches, _, _ = sources.load("builtin:wikipedia")
    texts = [r["text"] for b in batches for r in b if len(r["text"].split()) >= 8]
    alpaca = ROOT.parent / "shared/data/alpaca/alpaca_data.json"
    if alpaca.is_file():
        texts += [r["output"] for r in json.loads(alpaca.read_text()) if r["output"]]
    return (texts * (n // len(texts) + 1))[:n]


@functools.cache
def _tokenizer():
    from tuneline.modeling import load_tokenizer

    return load_tokenizer("gpt2-scratch-tiny").backend_tokenizer  # loaded once per process


def _encode_chunks(chunks: list[list[str]], threads: bool) -> list[list[int]]:
    tok = _tokenizer()
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads else "false"
    return [e.ids for c in chunks for e in tok.encode_batch_fast(c, add_special_tokens=False)]


def _worker(chunk: list[str]) -> list[list[int]]:
    return _encode_chunks([chunk], threads=False)


def main() -> None:
    from tuneline.tokenization import ENCODE_CHUNK

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=60_000)
    ap.add_argument("--out", default=str(ROOT / "bench/results/tokenize_parallel.json"))
    args = ap.parse_args()
    texts = _texts(args.texts)
    chunks = [texts[i : i + ENCODE_CHUNK] for i in range(0, len(texts), ENCODE_CHUNK)]
    _encode_chunks(chunks[:1], True)  # load the tokenizer once
    results, ids = {}, {}
    for name in ("rust threads", "one thread", "num_proc"):
        t = time.perf_counter()
        if name == "num_proc":
            n = os.cpu_count() or 1
            with multiprocessing.get_context("fork").Pool(n) as pool:  # workers inherit the loaded tokenizer
                ids[name] = [x for part in pool.map(_worker, chunks) for x in part]
        else:
            ids[name] = _encode_chunks(chunks, threads=name == "rust threads")
        results[name] = time.perf_counter() - t
    tokens = sum(map(len, ids["one thread"]))
    assert ids["rust threads"] == ids["one thread"] == ids["num_proc"]
    print(f"{len(texts):,} texts, {tokens:,} tokens, {os.cpu_count()} CPUs")
    print("| way | s | tokens/s | vs one thread |")
    print("|---|---|---|---|")
    for name, s in results.items():
        print(f"| {name} | {s:.1f} | {tokens / s:,.0f} | {results['one thread'] / s:.2f}x |")
    out = {"texts": len(texts), "tokens": tokens, "cpus": os.cpu_count(), "seconds": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
