"""Text → token ids: the task's template, the answer-only loss mask, over-long examples,
and the tokenizer's identity (so token data never meets another tokenizer).

Used by tokenize (the training data) and by evaluation (the test rows, tokenized by each
model's own tokenizer).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tuneline import progress, tasks
from tuneline.data import TOKENIZED_META
from tuneline.errors import TunelineError
from tuneline.io import read_json
from tuneline.packing import IGNORE, Example

ENCODE_CHUNK = 2048  # examples per batched tokenizer call


def tokenizer_hash(tok) -> str:
    """Content hash of the tokenizer (vocab, merges, normalizer, special tokens)."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def check_tokenizer(tok, meta: Path = TOKENIZED_META) -> None:
    """Refuse token data made with a different tokenizer than the one about to use it."""
    if meta.is_file() and read_json(meta)["tokenizer_sha256"] != tokenizer_hash(tok):
        raise TunelineError(
            f"{meta.parent} was made with a different tokenizer than model.name's",
            "re-run tokenization: dvc repro -f tokenize (tuneline run does this itself)",
        )


def encode(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts in one parallel Rust call (the transformers wrapper would
    build a Python BatchEncoding per text: ~40% of the time, for the same ids)."""
    if not tok.is_fast:
        return tok(texts, add_special_tokens=False)["input_ids"]
    # tuneline turns Rust-side threads off by default (they deadlock across forks); a batch
    # call in this process is safe, and the env var is read per call.
    backend = tok.backend_tokenizer
    # A padded `tok(..., padding=True)` call (generation does one) leaves padding switched
    # on in the backend; ids must never carry it.
    backend.no_padding()
    backend.no_truncation()
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def encode_rows(tok, rows: list[dict], task: tasks.Task, labels: list[str]) -> list[Example]:
    """Batch-tokenize prompts and answers (one fast-tokenizer call each, not per row)."""
    prompts, answers = zip(*(tasks.render(task, r, labels) for r in rows))
    p_ids, a_ids = encode(tok, list(prompts)), encode(tok, list(answers))
    eos = tok.eos_token_id
    return [Example(p + a + [eos], [IGNORE] * len(p) + a + [eos]) for p, a in zip(p_ids, a_ids)]


def encode_split(tok, rows: list[dict], task: tasks.Task, labels: list[str], split: str) -> list[Example]:
    """encode_rows in chunks, so a large split shows progress; the same ids (a text's ids
    never depend on the others in its batch), and chunks big enough to keep the batching win."""
    out: list[Example] = []
    with progress.bar("tokenize", len(rows), "examples", what=split) as b:
        for i in range(0, len(rows), ENCODE_CHUNK):
            chunk = encode_rows(tok, rows[i : i + ENCODE_CHUNK], task, labels)
            b.advance(len(chunk), tokens=sum(len(e.input_ids) for e in chunk))
            out += chunk
    return out


def fit(examples: list[Example], max_length: int, policy: str, split: str) -> tuple[list[Example], int]:
    """Apply the over-long policy; returns the examples kept and how many were over-long."""
    over = [i for i, e in enumerate(examples) if len(e.input_ids) > max_length]
    if not over:
        return examples, 0
    where = f"{len(over)} of {len(examples)} {split} examples are longer than tokenize.max_length={max_length}"
    if policy == "error" or len(over) == len(examples):
        raise TunelineError(
            f"tokenize: {where}", "raise tokenize.max_length, or set tokenize.overlong to drop/truncate"
        )
    # Never silent: an answer cut short teaches the model to stop early, so say so.
    print(f"[tokenize] {where}: {'dropped' if policy == 'drop' else 'truncated'}", flush=True)
    if policy == "drop":
        return [e for e in examples if len(e.input_ids) <= max_length], len(over)
    return [Example(e.input_ids[:max_length], e.labels[:max_length]) for e in examples], len(over)


def lint(examples: list[Example], split: str) -> None:
    """Fail on examples that would train nothing (e.g. an answer truncated away)."""
    empty = [i for i, e in enumerate(examples) if e.labels.count(IGNORE) >= len(e.labels) - (e.labels[0] != IGNORE)]
    if empty:
        raise TunelineError(
            f"tokenize: {len(empty)} {split} examples have no trainable token (first: #{empty[0]})",
            "check the answer column, or use tokenize.overlong=drop instead of truncate",
        )
