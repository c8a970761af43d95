"""tokenize: apply the task's template, mask the loss to the answer, pack.

Writes data/tokenized/{train,val}.parquet (one packed row per record: `input_ids`,
`labels` with IGNORE on prompt tokens, `seq_lens` of the examples it holds),
data/tokenized/meta.json (the tokenizer's content hash, the template version and the
packing params the rows were made with) and metrics/tokenize.json. The test split is not
tokenized here: evaluation tokenizes it with each evaluated model's own tokenizer.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from tuneline import tasks
from tuneline.config import Params
from tuneline.data import PREPARED, TOKENIZED, metrics_file, read_split
from tuneline.errors import TunelineError
from tuneline.io import atomic_dir, write_json
from tuneline.modeling import check_pair, load_tokenizer
from tuneline.packing import pack, stats
from tuneline.tokenization import encode_split, fit, lint, tokenizer_hash

# seed: the stage runner seeds torch before every stage (tokenize itself draws nothing).
PARAMS = (
    "seed",
    "model.name",
    "prepare.task",
    "prepare.labels",
    "tokenize.max_length",
    "tokenize.packing",
    "tokenize.overlong",
)
INPUTS = (PREPARED,)
OUTS = (TOKENIZED,)
SPLITS = ("train", "val")  # the test split is tokenized by evaluation, per evaluated model


def run(params: Params) -> dict:
    from tuneline.tracking import log_metrics

    cfg, task = params.tokenize, tasks.TASKS[params.prepare.task]
    tok = load_tokenizer(params.model.name)
    check_pair(params.model.name, tok)  # before hours of training on ids the model cannot read
    meta = {
        "tokenizer_sha256": tokenizer_hash(tok),
        "template_version": tasks.TEMPLATE_VERSION,
        "task": task.name,
        **cfg.model_dump(),
    }
    metrics: dict = {"template_version": tasks.TEMPLATE_VERSION}
    with atomic_dir(TOKENIZED) as tmp:
        for split in SPLITS:
            examples = encode_split(tok, read_split(split), task, params.prepare.labels, split)
            n_over = 0
            if cfg.packing != "concat":  # concat cuts documents at block edges by design
                examples, n_over = fit(examples, cfg.max_length, cfg.overlong, split)
            lint(examples, split)
            rows = pack(examples, cfg.max_length, cfg.packing)
            if not rows:
                raise TunelineError(
                    f"tokenize: the {split} split has fewer than max_length={cfg.max_length} tokens",
                    "lower tokenize.max_length or use more data",
                )
            pq.write_table(pa.Table.from_pylist(rows), tmp / f"{split}.parquet")
            s = stats(rows, [len(e.input_ids) for e in examples])
            s["overlong_examples"] = n_over
            s["truncated_examples"] = n_over if cfg.overlong == "truncate" else 0
            if cfg.packing == "concat":
                s["dropped_tail_tokens"] = sum(len(e.input_ids) for e in examples) - s["tokens"]
            metrics[split] = s
        write_json(tmp / "meta.json", meta)
    write_json(metrics_file("tokenize"), metrics)
    for split in SPLITS:
        log_metrics(metrics[split], prefix=f"tokenize_{split}_")
    t = metrics["train"]
    print(
        f"[tokenize] train: {t['examples']} examples -> {t['sequences']} sequences ({cfg.packing}, "
        f"T<={cfg.max_length}); pad share {t['pad_share']:.1%} (seed pad-to-128: {t['pad_share_seed_pad128']:.1%}); "
        f"trainable tokens {t['trainable_token_share']:.1%}",
        flush=True,
    )
    return metrics
