"""Token data on disk: written by tokenize as it encodes, read by train one batch at a time.

Two layouts per split, under data/tokenized/ (meta.json says which, per split):

- `blocks` (packing: concat, the nanoGPT layout): `<split>.tokens`, every example's ids
  joined in one flat array (uint16 when the vocabulary fits, else uint32), and the index
  `<split>.index`, int64 end offsets of the examples, with `<split>.mask`, one uint8 per
  token, 1 where it is trained (left out when every token is). Row i is the block of tokens
  [i*T, (i+1)*T); the remainder after the last whole block is never read. Training
  memory-maps the files.
- `rows` (packing: bfd or none): `<split>.arrow`, an Arrow IPC file of packed rows with
  list<int32> columns `input_ids`, `labels` (IGNORE on untrained tokens) and `seq_lens` (the
  examples in the row, in order). It is built in two passes: the examples are first written
  in the blocks layout (a temporary), packed by length alone (`packing.bfd`), then gathered
  into rows chunk by chunk and written as they are made.

Memory does not grow with the corpus: a batch of examples, plus, for `rows`, 12 bytes per
example for the packing. Disk is the bound: about 2-3 bytes per token (blocks), 8 (rows).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from itertools import chain
from pathlib import Path

import numpy as np

from tuneline.data import TOKENIZED
from tuneline.errors import TunelineError
from tuneline.io import read_json
from tuneline.packing import IGNORE, bfd
from tuneline.tokenization import Spans

ROWS_PER_CHUNK = 2048  # packed rows gathered and written per Arrow record batch


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ExampleWriter:
    """Appends examples (ids, trained spans) to the blocks layout, batch by batch."""

    def __init__(self, root: Path, name: str, dtype: np.dtype):
        self.root, self.name, self.dtype = root, name, dtype
        self.files = {k: open(root / f"{name}.{k}", "wb") for k in ("tokens", "index", "mask")}
        self.tokens = self.examples = self.trained = 0

    def add(self, ids: list[list[int]], spans: list[Spans]) -> None:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        flat.astype(self.dtype).tofile(self.files["tokens"])
        (self.tokens + np.cumsum(lengths)).tofile(self.files["index"])
        mask = np.zeros(len(flat), np.uint8)
        for begin, trained in zip((np.cumsum(lengths) - lengths).tolist(), spans):
            for a, b in trained:
                mask[begin + a : begin + b] = 1
        mask.tofile(self.files["mask"])
        self.tokens += int(lengths.sum())
        self.trained += int(mask.sum())
        self.examples += len(ids)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        if self.trained == self.tokens:  # pretraining: every token trained, no mask to keep
            (self.root / f"{self.name}.mask").unlink()


class Examples:
    """The blocks layout read back: memory-mapped, nothing loaded up front."""

    def __init__(self, root: Path, name: str, dtype: np.dtype | str):
        self.root, self.name, self.dtype = root, name, np.dtype(dtype)

    def _map(self, kind: str, dtype) -> np.ndarray:
        path = self.root / f"{self.name}.{kind}"
        if path.stat().st_size == 0:
            return np.zeros(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    @property
    def ends(self) -> np.ndarray:
        return self._map("index", np.int64)

    def mask(self) -> np.ndarray | None:
        """1 where a token is trained; None when every token is (no mask file)."""
        return self._map("mask", np.uint8) if (self.root / f"{self.name}.mask").is_file() else None

    def tokens(self) -> np.ndarray:
        # A fresh map per read, as nanoGPT does: pages of an old map are not kept resident.
        return self._map("tokens", self.dtype)

    def labels_of(self, ids: np.ndarray, start: int) -> np.ndarray:
        """Labels of tokens [start, start + len(ids)): IGNORE where a token is not trained."""
        labels = ids.astype(np.int64, copy=True)
        mask = self.mask()
        if mask is not None:
            labels[np.asarray(mask[start : start + len(ids)]) == 0] = IGNORE
        return labels


def pack_rows(ex: Examples, lengths: np.ndarray, capacity: int, packing: str, out: Path) -> tuple[int, int]:
    """Pack the examples (bfd, or one per row) into out, an Arrow IPC file, chunk by chunk;
    returns (rows, longest row)."""
    import pyarrow as pa

    if packing == "bfd":
        members, starts = bfd(lengths, capacity)
    else:
        members, starts = np.arange(len(lengths), dtype=np.int64), np.arange(len(lengths) + 1, dtype=np.int64)
    ends = np.asarray(ex.ends)
    begins = ends - lengths
    mask = ex.mask()
    n_rows = len(starts) - 1
    list32 = pa.list_(pa.int32())
    schema = pa.schema([("input_ids", list32), ("labels", list32), ("seq_lens", list32)])
    longest = 0
    with pa.OSFile(str(out), "wb") as f, pa.ipc.new_file(f, schema) as w:
        for r0 in range(0, n_rows, ROWS_PER_CHUNK):
            r1 = min(r0 + ROWS_PER_CHUNK, n_rows)
            m = members[starts[r0] : starts[r1]]  # the examples of rows r0..r1, in row order
            lens = lengths[m]
            total = int(lens.sum())
            # position of each gathered token inside its example, and where it is in the file
            first = np.repeat(np.cumsum(lens) - lens, lens)
            within = np.arange(total, dtype=np.int64) - first
            where = np.repeat(begins[m], lens) + within  # (total,) file positions
            ids = np.asarray(ex.tokens()[where], dtype=np.int32)
            labels = ids if mask is None else np.where(np.asarray(mask[where]) == 1, ids, IGNORE).astype(np.int32)
            row_lens = np.add.reduceat(lens, starts[r0:r1] - starts[r0]) if len(lens) else lens
            longest = max(longest, int(row_lens.max()))
            tok_off = np.concatenate(([0], np.cumsum(row_lens))).astype(np.int32)
            seg_off = (starts[r0 : r1 + 1] - starts[r0]).astype(np.int32)
            w.write_batch(
                pa.record_batch(
                    [
                        pa.ListArray.from_arrays(tok_off, ids),
                        pa.ListArray.from_arrays(tok_off, labels),
                        pa.ListArray.from_arrays(seg_off, lens.astype(np.int32)),
                    ],
                    schema=schema,
                )
            )
    return n_rows, longest


def read_rows(split: str, root: Path = TOKENIZED) -> TokenRows:
    """Packed token rows of one split, read from disk on demand."""
    return TokenRows(split, root)


class TokenRows:
    """Packed rows of one split, read from disk on demand. `rows[i]` is a dict of int64
    arrays {input_ids, labels} (T,) and the list `seq_lens`; `rows[a:b:k]` a list of them."""

    def __init__(self, split: str, root: Path):
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise TunelineError(f"{root} has no token data", "run the tokenize stage first (dvc repro tokenize)")
        meta = read_json(meta_path)
        info = meta.get("splits", {}).get(split)
        if info is None or (info["layout"] == "blocks" and "masked_tokens" not in info):  # before per-token masks
            raise TunelineError(
                f"{root} holds token data in an older layout", "re-run tokenization: dvc repro -f tokenize"
            )
        self.layout, self.n = info["layout"], info["rows"]
        if self.layout == "blocks":
            self.block = meta["max_length"]
            self.examples = Examples(root, split, info["dtype"])
            self.all_trained = info["masked_tokens"] == 0
        else:
            import pyarrow as pa

            self.reader = pa.ipc.open_file(pa.memory_map(str(root / f"{split}.arrow")))
            sizes = [self.reader.get_batch(k).num_rows for k in range(self.reader.num_record_batches)]
            self.batch_starts = np.cumsum([0, *sizes])
            self.cache: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        i %= self.n
        if self.layout == "blocks":
            T = self.block
            ids = np.asarray(self.examples.tokens()[i * T : (i + 1) * T], dtype=np.int64)
            labels = ids.copy() if self.all_trained else self.examples.labels_of(ids, i * T)
            return {"input_ids": ids, "labels": labels, "seq_lens": [T]}
        k = int(np.searchsorted(self.batch_starts, i, side="right")) - 1
        if k not in self.cache:  # zero-copy views of one record batch (the file is memory-mapped)
            b = self.reader.get_batch(k)
            self.cache[k] = tuple((c.offsets.to_numpy(), c.values.to_numpy()) for c in b.columns)
        j = i - int(self.batch_starts[k])
        (off, ids), (_, labels), (soff, segs) = self.cache[k]
        a, z = int(off[j]), int(off[j + 1])
        return {
            "input_ids": ids[a:z].astype(np.int64),
            "labels": labels[a:z].astype(np.int64),
            "seq_lens": segs[soff[j] : soff[j + 1]].tolist(),
        }


def _predicted(spans: Spans) -> int:
    """Trained tokens the model predicts: all but a first token (nothing comes before it)."""
    return sum(b - a for a, b in spans) - (1 if spans and spans[0][0] == 0 else 0)


def write_split(tok, batches: Iterable[list[dict]], n_rows: int, task, labels: list[str], cfg, out: Path, split: str):
    """Tokenize one prepared split batch by batch into out/; returns (its packing figures,
    its meta.json entry). Over-long examples follow tokenize.overlong (bfd/none; concat cuts
    documents at block edges by design): under truncate, an example whose every trained token
    is cut is dropped and counted. An example with no trainable token at all is an error."""
    from tuneline import progress
    from tuneline.tokenization import encode_batch

    T, blocks = cfg.max_length, cfg.packing == "concat"
    dtype = token_dtype(len(tok))
    w = ExampleWriter(out, split if blocks else f".{split}.examples", dtype)
    lengths = array("q")
    seen = n_over = n_cut = trainable = masked = pad128 = 0
    first_empty, n_empty = None, 0
    with progress.bar("tokenize", n_rows, "examples", what=split) as bar:
        for rows in batches:
            ids, spans = encode_batch(tok, rows, task, labels)
            empty = [i for i, s in enumerate(spans) if _predicted(s) == 0]  # an answer with nothing to learn
            if empty and first_empty is None:
                first_empty = seen + empty[0]
            n_empty += len(empty)
            seen += len(ids)
            if not blocks:
                over = [len(x) > T for x in ids]
                n_over += sum(over)
                if cfg.overlong == "truncate":  # a row whose every trained token is cut away is dropped
                    ids, spans = [x[:T] for x in ids], [[(a, min(b, T)) for a, b in s if a < T] for s in spans]
                    keep = [_predicted(s) > 0 or not o for s, o in zip(spans, over)]
                    n_cut += keep.count(False)
                else:  # drop (and error, which stops after counting them all)
                    keep = [not o for o in over]
                ids, spans = [x for x, k in zip(ids, keep) if k], [s for s, k in zip(spans, keep) if k]
            L = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            n_trained = sum(b - a for s in spans for a, b in s)
            trainable += n_trained
            masked += int(L.sum()) - n_trained
            pad128 += int(np.maximum(L, 128).sum())
            lengths.extend(L.tolist())
            w.add(ids, spans)
            bar.advance(len(rows), tokens=int(L.sum()))
    w.close()
    if n_over:
        where = f"{n_over} of {seen} {split} examples are longer than tokenize.max_length={T}"
        if cfg.overlong == "error" or n_over == seen:
            raise TunelineError(
                f"tokenize: {where}", "raise tokenize.max_length, or set tokenize.overlong to drop/truncate"
            )
        # Never silent: an answer cut short teaches the model to stop early, so say so.
        cut = f" ({n_cut} left with no trained token: dropped)" if n_cut else ""
        print(f"[tokenize] {where}: {'dropped' if cfg.overlong == 'drop' else 'truncated'}{cut}", flush=True)
    if n_empty:
        raise TunelineError(
            f"tokenize: {n_empty} {split} examples have no trainable token (first: #{first_empty})",
            "check the answer column: an empty answer teaches nothing",
        )
    n, tokens = w.examples, w.tokens
    if blocks:
        rows_out, longest = tokens // T, T
        if rows_out == 0:
            raise TunelineError(
                f"tokenize: the {split} split has fewer than max_length={T} tokens",
                "lower tokenize.max_length or use more data",
            )
        kept = rows_out * T
        ex = Examples(out, split, dtype)
        if kept < tokens and masked:  # trainable tokens in the dropped tail do not count
            tail = np.asarray(ex.tokens()[kept:], dtype=np.int64)
            trainable -= int((ex.labels_of(tail, kept) != IGNORE).sum())
        elif kept < tokens:
            trainable -= tokens - kept
        meta = {"layout": "blocks", "rows": rows_out, "dtype": dtype.name, "tokens": tokens, "examples": n}
        meta["masked_tokens"] = masked
    else:
        name = f".{split}.examples"
        rows_out, longest = pack_rows(
            Examples(out, name, dtype), np.frombuffer(lengths, np.int64), T, cfg.packing, out / f"{split}.arrow"
        )
        for k in ("tokens", "index", "mask"):
            (out / f"{name}.{k}").unlink(missing_ok=True)
        kept = tokens
        meta = {"layout": "rows", "rows": rows_out, "tokens": tokens, "examples": n}
    stats = {
        "examples": n,
        "sequences": rows_out,
        "tokens": kept,
        "pad_share": 1 - kept / (rows_out * longest),
        "pad_share_seed_pad128": 1 - tokens / pad128,
        "tokens_per_sequence": kept / rows_out,
        "examples_per_sequence": n / rows_out,
        "trainable_token_share": trainable / kept,
        "overlong_examples": n_over,
        "truncated_examples": n_over if cfg.overlong == "truncate" else 0,
    }
    if blocks:
        stats["dropped_tail_tokens"] = tokens - kept
    return stats, meta
