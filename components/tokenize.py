"""tokenize: apply the task's template, mask the loss to the answer, pack.

Streams each prepared split batch by batch into data/tokenized/ (tuneline/tokendata.py
has the layouts): concat writes a flat token stream that training cuts into blocks, bfd
and none write packed rows (`input_ids`, `labels` with IGNORE on prompt tokens, `seq_lens`
of the examples each holds) to an Arrow file. Also data/tokenized/meta.json (the
tokenizer's content hash, the template version, the packing params and each split's
layout) and metrics/tokenize.json. The test split is not tokenized here: evaluation
tokenizes it with each evaluated model's own tokenizer.
"""

from __future__ import annotations

from tuneline import tasks
from tuneline.config import Params
from tuneline.data import PREPARED, TOKENIZED, iter_split, metrics_file
from tuneline.io import atomic_dir, write_json
from tuneline.modeling import check_pair, load_tokenizer
from tuneline.tokendata import write_split
from tuneline.tokenization import ENCODE_CHUNK, template_hash, tokenizer_hash

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
    if task.chat:  # the conversations were rendered in this template: train checks it is the model's
        meta["chat_template_sha256"] = template_hash(tok)
    metrics: dict = {"template_version": tasks.TEMPLATE_VERSION}
    with atomic_dir(TOKENIZED) as tmp:
        meta["splits"] = {}
        for split in SPLITS:
            n_rows, batches = iter_split(split, ENCODE_CHUNK)
            metrics[split], meta["splits"][split] = write_split(
                tok, batches, n_rows, task, params.prepare.labels, cfg, tmp, split
            )
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
