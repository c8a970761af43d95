"""prepare: load the source, validate it, clean it, split it, write Parquet.

Outputs data/prepared/{train,val,test}.parquet with the task's columns (see
tuneline/tasks.py) and data/prepared/lineage.json (where the data came from: hub revision
or file hashes). Rows are validated before anything is written, de-duplicated *before*
splitting, and an example in both train and a separate test source is an error (or,
with prepare.on_overlap: drop, removed from train), so no example is in two splits.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tuneline import sources, tasks
from tuneline.config import Params
from tuneline.errors import TunelineError
from tuneline.io import atomic_dir, read_parquet, write_json

OUT = Path("data/prepared")
METRICS = Path("metrics/prepare.json")
SPLITS = ("train", "val", "test")

# A clean sentence: starts with a capital, plain words and light punctuation, ends with '.'
_CLEAN = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'\"()\-]*[a-z0-9)]\.$")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def clean_sentences(texts, min_words: int, max_words: int) -> list[str]:
    """Unique sentences in first-seen order, min_words..max_words long."""
    seen: dict[str, None] = {}
    for text in texts:
        for para in text.split("\n"):  # a heading line never runs into the next sentence
            for sent in _SPLIT.split(" ".join(para.split())):
                n = len(sent.split())
                if min_words <= n <= max_words and _CLEAN.match(sent):
                    seen.setdefault(sent)
    return list(seen)


def source_rows(spec: str, params: Params, where: str) -> tuple[list[dict], dict]:
    """Validated task rows of one source, plus its lineage."""
    cfg, task = params.prepare, tasks.TASKS[params.prepare.task]
    raw, lineage = sources.load(spec)
    if sources.is_wiki(spec):  # prose: sentences for descramble, paragraphs for pretraining
        texts = [r["text"] for r in raw]
        if task.name == "descramble":
            raw = [{"target": s} for s in clean_sentences(texts, cfg.min_words, cfg.max_words)]
        elif task.name == "pretrain":
            raw = [{"text": t} for t in texts if len(t.split()) >= cfg.min_words]
        else:
            raise TunelineError(f"{where} '{spec}' is prose, but task '{task.name}' needs labelled rows",
                                "use a file or hub dataset with the task's columns")
    return sources.task_rows(raw, task, cfg.columns, cfg.labels, f"{where} '{spec}'"), lineage


def example_key(row: dict, task: tasks.Task) -> tuple:
    return tuple(tasks.normalise(row[k]).lower() for k in task.key)


def dedupe(rows: list[dict], task: tasks.Task) -> list[dict]:
    seen: dict[tuple, dict] = {}
    for r in rows:
        seen.setdefault(example_key(r, task), r)
    return list(seen.values())


def split_rows(params: Params) -> tuple[dict[str, list[dict]], dict]:
    """{'train', 'val', 'test'} rows and metrics; raises before anything is written."""
    cfg, task = params.prepare, tasks.TASKS[params.prepare.task]
    rows, lineage = source_rows(cfg.source, params, "prepare.source")
    metrics: dict = {"source_rows": len(rows)}
    rows = dedupe(rows, task)
    metrics["duplicates_removed"] = metrics["source_rows"] - len(rows)
    rng = random.Random(params.seed)
    rng.shuffle(rows)
    lineages = {"source": lineage}
    if cfg.test_source:
        test, lineages["test_source"] = source_rows(cfg.test_source, params, "prepare.test_source")
        test = dedupe(test, task)
        test_keys = {example_key(r, task) for r in test}
        shared = [r for r in rows if example_key(r, task) in test_keys]
        if shared and cfg.on_overlap == "error":
            raise TunelineError(f"{len(shared)} examples are in both prepare.source and prepare.test_source "
                                f"(e.g. {str(shared[0])[:80]})", "de-duplicate the files, or set prepare.on_overlap=drop")
        rows = [r for r in rows if example_key(r, task) not in test_keys]
        metrics["overlap_dropped_from_train"] = len(shared)
        if cfg.n_test:
            random.Random(f"{params.seed}-test").shuffle(test)
            test = test[:cfg.n_test]
    else:
        test, rows = rows[:cfg.n_test], rows[cfg.n_test:]
    val, rows = rows[:cfg.n_val], rows[cfg.n_val:]
    train = rows[:cfg.n_train] if cfg.n_train else rows
    split = {"train": train, "val": val, "test": test}
    need = {"train": cfg.n_train or 1, "val": cfg.n_val, "test": cfg.n_test or 1}
    for name, got in split.items():
        if len(got) < need[name]:
            raise TunelineError(f"prepare: the {name} split has {len(got)} rows, but {need[name]} are needed "
                                f"({metrics['source_rows']} usable rows in the source)",
                                "lower prepare.n_train/n_val/n_test, or use more data")
    if task.name == "descramble":  # sources without scrambled inputs get them, seeded per split
        for name, got in split.items():
            split_rng = random.Random(f"{params.seed}-{name}")
            for r in got:
                r["source"] = r["source"] or tasks.scramble(r["target"], split_rng)
    metrics["lineage"] = lineages
    return split, metrics


def run(params: Params) -> dict:
    split, metrics = split_rows(params)
    lineage = metrics.pop("lineage")
    task = tasks.TASKS[params.prepare.task]
    with atomic_dir(OUT) as tmp:
        for name in SPLITS:
            rows = split[name]
            pq.write_table(pa.table({c: [r[c] for r in rows] for c in task.columns}), tmp / f"{name}.parquet")
            metrics[f"{name}_rows"] = len(rows)
            metrics[f"{name}_mean_words"] = sum(len(tasks.render(task, r, params.prepare.labels)[1].split())
                                                for r in rows) / len(rows)
        write_json(tmp / "lineage.json", lineage)
    write_json(METRICS, metrics)
    print(f"[prepare] {params.prepare.task}: " + ", ".join(f"{n} {metrics[f'{n}_rows']}" for n in SPLITS)
          + f" rows ({metrics['duplicates_removed']} duplicates removed)", flush=True)
    return metrics


def read_split(split: str, root: Path = OUT) -> list[dict]:
    return read_parquet(root / f"{split}.parquet", "prepare")
