"""tokenize: apply the task's template, mask the loss to the answer, pack.

Outputs data/tokenized/{train,val,test}.parquet (one packed row per record: `input_ids`,
`labels` with IGNORE on prompt tokens, `seq_lens` of the examples it holds),
data/tokenized/meta.json (the tokenizer's content hash, the template version and the
packing params the rows were made with) and metrics/tokenize.json.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from components.prepare import SPLITS, read_split
from tuneline import progress, tasks
from tuneline.config import Params
from tuneline.errors import TunelineError
from tuneline.io import atomic_dir, read_json, read_parquet, write_json
from tuneline.modeling import check_pair, load_tokenizer
from tuneline.packing import IGNORE, Example, pack, stats

OUT = Path("data/tokenized")
META = OUT / "meta.json"
METRICS = Path("metrics/tokenize.json")
ENCODE_CHUNK = 2048  # examples per batched tokenizer call


def tokenizer_hash(tok) -> str:
    """Content hash of the tokenizer (vocab, merges, normalizer, special tokens)."""
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]


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
            chunk = encode_rows(tok, rows[i:i + ENCODE_CHUNK], task, labels)
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
        raise TunelineError(f"tokenize: {where}", "raise tokenize.max_length, or set tokenize.overlong to drop/truncate")
    # Never silent: an answer cut short teaches the model to stop early, so say so.
    print(f"[tokenize] {where}: {'dropped' if policy == 'drop' else 'truncated'}", flush=True)
    if policy == "drop":
        return [e for e in examples if len(e.input_ids) <= max_length], len(over)
    return [Example(e.input_ids[:max_length], e.labels[:max_length]) for e in examples], len(over)


def lint(examples: list[Example], split: str) -> None:
    """Fail on examples that would train nothing (e.g. an answer truncated away)."""
    empty = [i for i, e in enumerate(examples) if e.labels.count(IGNORE) >= len(e.labels) - (e.labels[0] != IGNORE)]
    if empty:
        raise TunelineError(f"tokenize: {len(empty)} {split} examples have no trainable token (first: #{empty[0]})",
                            "check the answer column, or use tokenize.overlong=drop instead of truncate")


def run(params: Params) -> dict:
    from tuneline.tracking import log_metrics

    cfg, task = params.tokenize, tasks.TASKS[params.prepare.task]
    tok = load_tokenizer(params.model.name)
    check_pair(params.model.name, tok)  # before hours of training on ids the model cannot read
    meta = {"tokenizer_sha256": tokenizer_hash(tok), "template_version": tasks.TEMPLATE_VERSION,
            "task": task.name, **cfg.model_dump()}
    metrics: dict = {"template_version": tasks.TEMPLATE_VERSION}
    with atomic_dir(OUT) as tmp:
        for split in SPLITS:
            examples = encode_split(tok, read_split(split), task, params.prepare.labels, split)
            n_over = 0
            if cfg.packing != "concat":  # concat cuts documents at block edges by design
                examples, n_over = fit(examples, cfg.max_length, cfg.overlong, split)
            lint(examples, split)
            rows = pack(examples, cfg.max_length, cfg.packing)
            if not rows:
                raise TunelineError(f"tokenize: the {split} split has fewer than max_length={cfg.max_length} tokens",
                                    "lower tokenize.max_length or use more data")
            pq.write_table(pa.Table.from_pylist(rows), tmp / f"{split}.parquet")
            s = stats(rows, [len(e.input_ids) for e in examples])
            s["overlong_examples"] = n_over
            s["truncated_examples"] = n_over if cfg.overlong == "truncate" else 0
            if cfg.packing == "concat":
                s["dropped_tail_tokens"] = sum(len(e.input_ids) for e in examples) - s["tokens"]
            metrics[split] = s
        write_json(tmp / "meta.json", meta)
    write_json(METRICS, metrics)
    for split in SPLITS:
        log_metrics(metrics[split], prefix=f"tokenize_{split}_")
    t = metrics["train"]
    print(f"[tokenize] train: {t['examples']} examples -> {t['sequences']} sequences ({cfg.packing}, T<={cfg.max_length}); "
          f"pad share {t['pad_share']:.1%} (seed pad-to-128: {t['pad_share_seed_pad128']:.1%}); "
          f"trainable tokens {t['trainable_token_share']:.1%}", flush=True)
    return metrics


def check_tokenizer(tok, root: Path = OUT) -> None:
    """Refuse token data made with a different tokenizer than the one about to use it."""
    meta = root / "meta.json"
    if meta.is_file() and read_json(meta)["tokenizer_sha256"] != tokenizer_hash(tok):
        raise TunelineError(f"{root} was made with a different tokenizer than model.name's",
                            "re-run tokenization: dvc repro -f tokenize (tuneline run does this itself)")


def read_rows(split: str, root: Path = OUT) -> list[dict]:
    return read_parquet(root / f"{split}.parquet", "tokenize")
