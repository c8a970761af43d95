"""tokenize: apply the template, mask the loss to the answer, pack.

Outputs data/tokenized/{train,val,test}.parquet: one packed row per record with
`input_ids`, `labels` (IGNORE on prompt tokens) and `seq_lens` (the examples it holds),
plus metrics/tokenize.json with the packing figures.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from components.prepare import SPLITS, read_split
from tuneline import tasks
from tuneline.config import Params
from tuneline.errors import TunelineError
from tuneline.io import atomic_dir, read_parquet, write_json
from tuneline.modeling import load_tokenizer
from tuneline.packing import IGNORE, Example, pack, stats

OUT = Path("data/tokenized")
METRICS = Path("metrics/tokenize.json")


def encode_rows(tok, rows: list[dict]) -> list[Example]:
    """Batch-tokenize prompts and answers (one fast-tokenizer call each, not per row)."""
    prompts = tok([tasks.descramble_prompt(r["source"]) for r in rows], add_special_tokens=False)["input_ids"]
    answers = tok([tasks.descramble_answer(r["target"]) for r in rows], add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    return [Example(p + a + [eos], [IGNORE] * len(p) + a + [eos]) for p, a in zip(prompts, answers)]


def run(params: Params) -> dict:
    cfg = params.tokenize
    tok = load_tokenizer(params.model.name)
    metrics: dict = {"template_version": tasks.TEMPLATE_VERSION}
    with atomic_dir(OUT) as tmp:
        for split in SPLITS:
            examples = encode_rows(tok, read_split(split))
            too_long = [e for e in examples if len(e.input_ids) > cfg.max_length]
            if too_long:
                # Never truncate silently: an answer cut short would teach the model to stop early.
                print(f"[tokenize] {split}: dropping {len(too_long)} examples longer than "
                      f"tokenize.max_length={cfg.max_length}", flush=True)
            examples = [e for e in examples if len(e.input_ids) <= cfg.max_length]
            if not examples:
                raise TunelineError(f"tokenize: every {split} example is longer than max_length={cfg.max_length}",
                                    "raise tokenize.max_length")
            if any(all(x == IGNORE for x in e.labels) for e in examples):
                raise TunelineError(f"tokenize: {split} has examples with no trainable token", "check the data's target column")
            rows = pack(examples, cfg.max_length, cfg.packing)
            pq.write_table(pa.Table.from_pylist(rows), tmp / f"{split}.parquet")
            s = stats(rows, len(examples))
            s["truncated_or_dropped"] = len(too_long)
            metrics[split] = s
    write_json(METRICS, metrics)
    t = metrics["train"]
    print(f"[tokenize] train: {t['examples']} examples -> {t['sequences']} sequences of <= {cfg.max_length} tokens; "
          f"pad share {t['pad_share']:.1%} (seed pad-to-128: {t['pad_share_seed_pad128']:.1%})", flush=True)
    return metrics


def read_rows(split: str, root: Path = OUT) -> list[dict]:
    return read_parquet(root / f"{split}.parquet", "tokenize")
