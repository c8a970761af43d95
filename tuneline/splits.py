"""Source rows → validated, de-duplicated train/val/test splits, with no example in two.

Rows are validated before anything is written, de-duplicated *before* splitting, and an
example in both the source and a separate test source is an error (or, with
prepare.on_overlap: drop, removed from train). Prose sources (Wikipedia) become rows the
way the task says (`Task.prose`); inputs a source lacks are made by `Task.fill`, seeded per
split. `tuneline evaluate --data` reads its file through the same functions.
"""

from __future__ import annotations

import random

from tuneline import sources, tasks
from tuneline.config import Params
from tuneline.errors import TunelineError


def source_rows(spec: str, params: Params, where: str) -> tuple[list[dict], dict]:
    """Validated task rows of one source, plus its lineage."""
    cfg, task = params.prepare, tasks.TASKS[params.prepare.task]
    raw, lineage = sources.load(spec)
    if sources.is_wiki(spec):  # prose: sentences for descramble, paragraphs for pretraining
        if task.prose is None:
            raise TunelineError(
                f"{where} '{spec}' is prose, but task '{task.name}' needs labelled rows",
                "use a file or hub dataset with the task's columns",
            )
        raw = task.prose([r["text"] for r in raw], cfg.min_words, cfg.max_words)
    return sources.task_rows(raw, task, cfg.columns, cfg.labels, f"{where} '{spec}'"), lineage


def example_key(row: dict, task: tasks.Task) -> tuple:
    return tuple(tasks.normalise(row[k]).lower() for k in task.key)


def dedupe(rows: list[dict], task: tasks.Task) -> list[dict]:
    seen: dict[tuple, dict] = {}
    for r in rows:
        seen.setdefault(example_key(r, task), r)
    return list(seen.values())


def fill(rows: list[dict], task: tasks.Task, seed: str) -> list[dict]:
    """Inputs the source lacks, made from the answers (descramble: a seeded scramble)."""
    if task.fill is None:
        return rows
    rng = random.Random(seed)
    return [task.fill(r, rng) for r in rows]


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
            raise TunelineError(
                f"{len(shared)} examples are in both prepare.source and prepare.test_source "
                f"(e.g. {str(shared[0])[:80]})",
                "de-duplicate the files, or set prepare.on_overlap=drop",
            )
        rows = [r for r in rows if example_key(r, task) not in test_keys]
        metrics["overlap_dropped_from_train"] = len(shared)
        if cfg.n_test:
            random.Random(f"{params.seed}-test").shuffle(test)
            test = test[: cfg.n_test]
    else:
        test, rows = rows[: cfg.n_test], rows[cfg.n_test :]
    val, rows = rows[: cfg.n_val], rows[cfg.n_val :]
    train = rows[: cfg.n_train] if cfg.n_train else rows
    split = {"train": train, "val": val, "test": test}
    need = {"train": cfg.n_train or 1, "val": cfg.n_val, "test": cfg.n_test or 1}
    for name, got in split.items():
        if len(got) < need[name]:
            raise TunelineError(
                f"prepare: the {name} split has {len(got)} rows, but {need[name]} are needed "
                f"({metrics['source_rows']} usable rows in the source)",
                "lower prepare.n_train/n_val/n_test, or use more data",
            )
    split = {name: fill(got, task, f"{params.seed}-{name}") for name, got in split.items()}
    metrics["lineage"] = lineages
    return split, metrics


def file_rows(data: str, params: Params, limit: int = 0) -> tuple[list[dict], dict]:
    """Rows of any prepare.source form, validated, de-duplicated and filled exactly as
    prepare does for a test split (what `tuneline evaluate --data` scores)."""
    task = tasks.TASKS[params.prepare.task]
    rows, lineage = source_rows(data, params, "--data")
    return fill(dedupe(rows, task)[: limit or None], task, f"{params.seed}-test"), lineage
