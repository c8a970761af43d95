"""Source rows → validated, de-duplicated train/val/test splits, with no example in two,
streamed: no split and no source is ever held as Python objects.

Two passes. Pass 1 reads the source batch by batch, validates each row, and spools it to a
temporary Arrow file, keeping only an 8-byte digest of its example key (the normalised,
lower-cased key columns). Duplicates are the later rows with a digest seen before. Each
kept example then gets a rank, a seeded hash of its digest: the n_test lowest ranks are the
test split, the next n_val validation, the next n_train (0: all the rest) training. So the
draw depends only on the examples and the seed, never on how the input is cut into files
or batches, and an example lands in one split only. Pass 2 streams the spool into one
Parquet file per split, in source order, filling inputs the source lacks (`Task.fill`,
seeded per split). Memory: one batch, plus 8 bytes per source row (its digest) and, for
the moment of the draw, about 40 (sorting digests and ranks).

With a separate test source, an example in both is an error (or, with
prepare.on_overlap: drop, removed from train). `tuneline evaluate --data` reads its file
through `file_rows`, with the same validation, de-duplication and fill as the test split.
"""

from __future__ import annotations

import hashlib
import random
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tuneline import neardup, sources, tasks
from tuneline.config import Params
from tuneline.errors import TunelineError
from tuneline.rows import task_source

SPLIT_IDS = {"train": 1, "val": 2, "test": 3}  # 0: not used (a duplicate, an overlap, beyond n_train)
# A Parquet row group ends at ROW_GROUP rows or ROW_GROUP_CHARS characters of text, whichever
# comes first: a function of the rows alone, so the files' bytes never depend on batching,
# and memory (here, and in readers, which decode a group at a time) stays bounded.
ROW_GROUP = 50_000
ROW_GROUP_CHARS = 1 << 26


def digest(row: dict, task: tasks.Task) -> int:
    """64-bit hash of an example's key: equal for rows that differ only in case and spacing."""
    key = "\x1f".join(tasks.normalise(row[k]).lower() for k in task.key)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a uint64 → uniform uint64 bijection (vectorised)."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def ranks(digests: np.ndarray, seed: int | str) -> np.ndarray:
    """The seeded draw order of examples: a hash of (digest, seed)."""
    salt = int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=8).digest(), "little")
    return _mix(digests ^ np.uint64(salt))


class Spool:
    """Pass 1: validated rows spooled to an Arrow file on disk, with their key digests."""

    def __init__(self, path: Path, task: tasks.Task):
        import pyarrow as pa

        self.path, self.task = path, task
        self.schema = pa.schema([(c, pa.string()) for c in task.columns])
        self.digests = array("Q")

    def fill(self, batches: sources.Batches) -> Spool:
        import pyarrow as pa

        with pa.OSFile(str(self.path), "wb") as f, pa.ipc.new_file(f, self.schema) as w:
            for rows in batches:
                self.digests.extend(digest(r, self.task) for r in rows)
                w.write_batch(pa.record_batch({c: [r[c] for r in rows] for c in self.task.columns}, self.schema))
        return self

    def digest_array(self) -> np.ndarray:
        return np.frombuffer(self.digests, dtype=np.uint64) if len(self.digests) else np.zeros(0, np.uint64)

    def first_seen(self) -> np.ndarray:
        """Indices of each key's first row, in source order."""
        _, first = np.unique(self.digest_array(), return_index=True)
        return np.sort(first)

    def batches(self) -> Iterator[list[dict]]:
        import pyarrow as pa

        with pa.OSFile(str(self.path), "rb") as f:  # plain reads: the spool never maps into memory
            r = pa.ipc.open_file(f)
            for i in range(r.num_record_batches):
                yield r.get_batch(i).to_pylist()

    def row(self, i: int) -> dict:
        for rows in self.batches():
            if i < len(rows):
                return rows[i]
            i -= len(rows)
        raise IndexError(i)


def assign(params: Params, spool: Spool, test: Spool | None, metrics: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """Each spooled row's split id (SPLIT_IDS, 0 = unused), for the source and the test
    source; raises, before anything is written, when a split would be short."""
    cfg = params.prepare
    n = len(spool.digests)
    metrics["source_rows"] = n
    kept = spool.first_seen()
    metrics["duplicates_removed"] = n - len(kept)
    digests = spool.digest_array()
    out = np.zeros(n, dtype=np.int8)
    test_out = None
    if test is not None:
        test_kept = test.first_seen()
        test_keys = test.digest_array()[test_kept]
        shared = kept[np.isin(digests[kept], test_keys)]
        if len(shared) and cfg.on_overlap == "error":
            raise TunelineError(
                f"prepare: {len(shared)} examples are in both prepare.source and prepare.test_source "
                f"(e.g. {str(spool.row(int(shared[0])))[:80]})",
                "de-duplicate the files, or set prepare.on_overlap=drop (or report)",
            )
        if cfg.on_overlap == "drop":
            kept = np.setdiff1d(kept, shared, assume_unique=True)
            metrics["overlap_dropped_from_train"] = len(shared)
        else:
            metrics["overlap_kept_in_train"] = len(shared)
        test_out = np.zeros(len(test.digests), dtype=np.int8)
        pick = test_kept[np.argsort(ranks(test_keys, f"{params.seed}-test"), kind="stable")]
        test_out[pick[: cfg.n_test or None]] = SPLIT_IDS["test"]
        n_test = int((test_out > 0).sum())
        n_src_test = 0
    else:
        n_src_test = n_test = cfg.n_test
    order = kept[np.argsort(ranks(digests[kept], params.seed), kind="stable")]
    out[order[:n_src_test]] = SPLIT_IDS["test"]
    out[order[n_src_test : n_src_test + cfg.n_val]] = SPLIT_IDS["val"]
    candidates = order[n_src_test + cfg.n_val :]  # for train, in draw order
    if cfg.near_dup_threshold is not None:
        candidates = _near_duplicates(params, spool, test, out, test_out, candidates, metrics)
    out[candidates[: cfg.n_train or None]] = SPLIT_IDS["train"]
    got = {"train": int((out == 1).sum()), "val": int((out == 2).sum()), "test": n_test}
    need = {"train": cfg.n_train or 1, "val": cfg.n_val, "test": cfg.n_test or 1}
    dropped = metrics.get("overlap_dropped_from_train", 0)
    near = metrics.get("near_duplicates", 0) if cfg.on_overlap == "drop" else 0
    for name in ("train", "val", "test"):
        if got[name] < need[name]:
            fix = (
                f"set prepare.n_train=0 to train on the {got[name]} that remain, or use more data"
                if name == "train" and got[name]
                else "lower prepare.n_train/n_val/n_test, or use more data"
            )
            if name == "train" and near:  # the audit took them: a looser threshold keeps more
                fix = f"raise prepare.near_dup_threshold ({cfg.near_dup_threshold} now) to drop fewer, or {fix}"
            if dropped and dropped >= len(kept):  # the test source is (mostly) the source itself
                fix = "point prepare.test_source at other examples, or set prepare.test_source=null to draw test from the source"
            raise TunelineError(
                f"prepare: the {name} split has {got[name]} rows, but {need[name]} are needed "
                f"({len(kept)} usable rows in the source"
                + (f", after dropping the {dropped} that prepare.test_source also holds" if dropped else "")
                + (f"; {near} more were dropped from train as near duplicates of val/test rows" if near else "")
                + ")",
                fix,
            )
    return out, test_out


def _near_duplicates(
    params: Params,
    spool: Spool,
    test: Spool | None,
    ids: np.ndarray,
    test_ids: np.ndarray | None,
    candidates: np.ndarray,
    metrics: dict,
    top: int = 10,
) -> np.ndarray:
    """The near-duplicate audit (tuneline/neardup.py): find the training candidates that are
    near duplicates of a val/test row, then stop, drop them, or report them, as
    prepare.on_overlap says. Returns the candidates left for train, in draw order."""
    import time

    cfg, task = params.prepare, tasks.TASKS[params.prepare.task]
    t0 = time.time()
    index = neardup.Index(cfg.near_dup_threshold)
    n = len(ids)
    held_out = {i: neardup.key_text(r, task) for i, r in _rows_where(spool, ids > 0)}  # n_val + n_test
    if test is not None:
        held_out |= {n + j: neardup.key_text(r, task) for j, r in _rows_where(test, test_ids > 0)}
    index.add(held_out.items())
    is_candidate = np.zeros(n, dtype=bool)
    is_candidate[candidates] = True
    found: dict[int, tuple[neardup.Pair, str]] = {}  # row -> (pair, its text)
    batch: list[tuple[int, str]] = []

    def look_up() -> None:
        texts = dict(batch)
        found.update((p.train, (p, texts[p.train])) for p in index.query(batch))
        batch.clear()

    for i, r in _rows_where(spool, is_candidate):
        batch.append((i, neardup.key_text(r, task)))
        if len(batch) == 4096:
            look_up()
    look_up()
    flagged = np.isin(candidates, np.fromiter(found, dtype=np.int64, count=len(found)))
    if cfg.n_train:  # only the flagged rows within the train split's reach count
        reach = cfg.n_train
        if cfg.on_overlap == "drop":  # dropping them, train reaches further down the draw
            clean = np.flatnonzero(~flagged)
            reach = int(clean[cfg.n_train - 1]) + 1 if len(clean) >= cfg.n_train else len(candidates)
        flagged[reach:] = False
    hits = sorted((found[int(i)] for i in candidates[flagged]), key=lambda h: (-h[0].similarity, h[0].train))
    seconds = time.time() - t0

    def split(i: int) -> str:
        return "test" if i >= n or ids[i] == SPLIT_IDS["test"] else "val"

    pairs = [
        {"train": text, "split": split(p.other), "other": held_out[p.other], "similarity": round(p.similarity, 4)}
        for p, text in hits[:top]
    ]
    what = {"error": "none allowed", "drop": "dropped from train", "report": "kept in train"}[cfg.on_overlap]
    print(
        f"[prepare] near-duplicate audit: {len(hits)} training rows within Jaccard "
        f">= {cfg.near_dup_threshold} of a val/test row ({what}); "
        f"{int(is_candidate.sum())} rows checked in {seconds:.1f}s",
        flush=True,
    )
    if hits and cfg.on_overlap == "error":
        p = pairs[0]
        raise TunelineError(
            f"prepare: {len(hits)} training rows are near duplicates of val/test rows (Jaccard >= "
            f"{cfg.near_dup_threshold}; e.g. train {p['train'][:60]!r} ~ {p['split']} {p['other'][:60]!r}, "
            f"{p['similarity']:.2f})",
            "set prepare.on_overlap=drop to remove them from train (or report to keep them), "
            "or raise prepare.near_dup_threshold",
        )
    metrics["near_duplicates"] = len(hits)
    metrics["near_duplicate_pairs"] = pairs
    return candidates[~flagged] if cfg.on_overlap == "drop" else candidates


def _rows_where(spool: Spool, mask: np.ndarray) -> Iterator[tuple[int, dict]]:
    """(row index, row) of the spooled rows where mask is True, in source order."""
    start = 0
    for rows in spool.batches():
        for k in np.flatnonzero(mask[start : start + len(rows)]).tolist():
            yield start + k, rows[k]
        start += len(rows)


def write_splits(params: Params, out: Path) -> dict:
    """Stream the sources into out/{train,val,test}.parquet; returns prepare's metrics (with
    'lineage'). Temporary spools live in `out` and are removed."""
    cfg, task = params.prepare, tasks.TASKS[params.prepare.task]
    skipped: dict[str, dict] = {"source": {}, "test_source": {}}  # prepare.bad_rows=skip: what each left out
    rows, lineage = task_source(cfg.source, cfg, "prepare.source", skipped=skipped["source"])
    spool = Spool(out / ".source.arrow", task).fill(rows)
    lineages, test = {"source": lineage}, None
    if cfg.test_source:
        rows, lineages["test_source"] = task_source(
            cfg.test_source, cfg, "prepare.test_source", skipped=skipped["test_source"]
        )
        test = Spool(out / ".test_source.arrow", task).fill(rows)
    metrics: dict = {f"bad_rows_{which}": v for which, v in skipped.items() if v}
    if cfg.bad_rows == "skip":  # a number for MLflow and `dvc metrics diff`, 0 when none was bad
        metrics["bad_rows"] = sum(v.get("rows", 0) for v in skipped.values())
    ids, test_ids = assign(params, spool, test, metrics)
    writers = {name: _Writer(out / f"{name}.parquet", spool.schema) for name in SPLIT_IDS}
    rngs = {name: random.Random(f"{params.seed}-{name}") for name in SPLIT_IDS}
    counts, words = dict.fromkeys(SPLIT_IDS, 0), dict.fromkeys(SPLIT_IDS, 0)
    try:
        for sp, which in ((spool, ids), (test, test_ids)):
            if sp is None:
                continue
            start = 0
            for batch in sp.batches():
                here = which[start : start + len(batch)]
                start += len(batch)
                for name, k in SPLIT_IDS.items():
                    chosen = [r for r, s in zip(batch, here.tolist()) if s == k]
                    if not chosen:
                        continue
                    if task.fill is not None:  # one seeded stream per split, in source order
                        chosen = [task.fill(r, rngs[name]) for r in chosen]
                    writers[name].add(chosen)
                    counts[name] += len(chosen)
                    words[name] += sum(len(task.answer(r).split()) for r in chosen)
    finally:
        for w in writers.values():
            w.close()
        for sp in (spool, test):
            if sp is not None:
                sp.path.unlink(missing_ok=True)
    for name in SPLIT_IDS:
        metrics[f"{name}_rows"] = counts[name]
        metrics[f"{name}_mean_words"] = words[name] / counts[name]
    metrics["lineage"] = lineages
    return metrics


class _Writer:
    """Parquet rows written in row groups cut by ROW_GROUP / ROW_GROUP_CHARS."""

    def __init__(self, path: Path, schema):
        import pyarrow.parquet as pq

        self.schema, self.rows, self.chars = schema, [], 0
        self.w = pq.ParquetWriter(path, schema)

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            self.rows.append(r)
            self.chars += sum(len(r[c]) for c in self.schema.names)
            if len(self.rows) >= ROW_GROUP or self.chars >= ROW_GROUP_CHARS:
                self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        self.w.write_table(pa.table({c: [r[c] for r in self.rows] for c in self.schema.names}, self.schema))
        self.rows, self.chars = [], 0

    def close(self) -> None:
        if self.rows:
            self._flush()
        self.w.close()


def file_rows(data: str, params: Params, limit: int = 0) -> tuple[list[dict], dict]:
    """Rows of any prepare.source form, validated, de-duplicated and filled exactly as
    prepare does for a test split (what `tuneline evaluate --data` scores: the first
    `limit` examples, or all; only those are held)."""
    task = tasks.TASKS[params.prepare.task]
    batches, lineage = task_source(data, params.prepare, "--data")
    seen: set[int] = set()
    rows: list[dict] = []
    for batch in batches:
        for r in batch:
            d = digest(r, task)
            if d not in seen:
                seen.add(d)
                rows.append(r)
        if limit and len(rows) >= limit:
            break
    rows = rows[: limit or None]
    if task.fill is not None:
        rng = random.Random(f"{params.seed}-test")
        rows = [task.fill(r, rng) for r in rows]
    return rows, lineage
