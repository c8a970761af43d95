"""Pack tokenized examples into rows, build batches.

- `bfd` (supervised tasks): a packed row holds several whole examples. Each example restarts its position ids at 0
and sees only its own tokens: the batch carries segment ids, which tuneline.attention turns
into a block-diagonal causal mask (dense for sdpa on CPU, a flex BlockMask on a GPU), so a
packed example produces the same logits as the example alone (tests check it on the models
we train).
- `concat` (pretraining, the HF run_clm recipe): all examples joined, cut into blocks of
  exactly `capacity` tokens, the final remainder dropped; one segment per block.
- `none`: one example per row.
"""

from __future__ import annotations

import heapq
from array import array
from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100  # label value cross-entropy skips: prompt and padding tokens


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def bfd(lengths, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing bin packing on lengths alone: (members, starts), bin b holding
    examples members[starts[b]:starts[b + 1]] in the order they were placed, each bin <= capacity.

    Longest first (ties in index order); each example goes to the open bin whose free space
    is the smallest that still fits it (ties: the oldest bin), else opens a new bin. Open bins
    sit in one bucket per free-space value; a Python int used as a bitset finds the smallest
    non-empty bucket >= n in one shift, so the whole packing is O(n log n) (the sort) and
    handles tens of millions of lengths with a few bytes each.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        i = int(np.argmax(lengths > capacity))
        raise ValueError(f"example {i} has {lengths[i]} tokens > capacity {capacity}")
    order = np.argsort(-lengths, kind="stable")
    bin_of = array("q")  # bin of the example placed at each position of `order`
    buckets: list[list[int]] = [[] for _ in range(capacity + 1)]  # min-heaps of bin ids by free space
    nonempty = 0  # bit s set <=> some open bin has exactly s tokens free
    n_bins = 0
    for n in lengths[order].tolist():
        fits = nonempty >> n
        if fits:
            space = n + (fits & -fits).bit_length() - 1  # the smallest free space >= n
            heap = buckets[space]
            b = heapq.heappop(heap)
            if not heap:
                nonempty ^= 1 << space
        else:
            space, b = capacity, n_bins
            n_bins += 1
        bin_of.append(b)
        left = space - n
        if left:
            if not buckets[left]:
                nonempty |= 1 << left
            heapq.heappush(buckets[left], b)
    placed = np.frombuffer(bin_of, dtype=np.int64) if len(bin_of) else np.zeros(0, np.int64)
    members = order[np.argsort(placed, kind="stable")]  # by bin, placement order within a bin
    starts = np.zeros(n_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(placed, minlength=n_bins), out=starts[1:])
    return members, starts


def groups(members: np.ndarray, starts: np.ndarray) -> list[list[int]]:
    """bfd's bins as lists of example indices (small inputs: tests, evaluation)."""
    return [members[a:b].tolist() for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())]


def concat(examples: list[Example], block: int, drop_remainder: bool = True) -> list[dict]:
    """Concatenate everything, cut into `block`-token rows, drop the remainder (< block)
    when training (the HF run_clm recipe); evaluation keeps it as a last, shorter row."""
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    n = len(ids) // block * block if drop_remainder else len(ids)
    return [
        {"input_ids": ids[i : i + block], "labels": labels[i : i + block], "seq_lens": [min(block, n - i)]}
        for i in range(0, n, block)
    ]


def pack(examples: list[Example], capacity: int, packing: str) -> list[dict]:
    """Rows of {input_ids, labels, seq_lens}; no padding is stored (collate pads)."""
    return pack_groups(examples, capacity, packing)[0]


def pack_groups(examples: list[Example], capacity: int, packing: str) -> tuple[list[dict], list[list[int]]]:
    """`pack`'s rows and, per row, the indices of the examples in it, in segment order
    (concat: empty; its blocks cut across examples)."""
    if packing == "concat":
        return concat(examples, capacity), []
    bins = (
        groups(*bfd([len(e.input_ids) for e in examples], capacity))
        if packing == "bfd"
        else [[i] for i in range(len(examples))]
    )
    rows = []
    for g in bins:
        row = {"input_ids": [], "labels": [], "seq_lens": []}
        for i in g:
            row["input_ids"] += examples[i].input_ids
            row["labels"] += examples[i].labels
            row["seq_lens"].append(len(examples[i].input_ids))
        rows.append(row)
    return rows, bins


def collate(rows: list[dict], pad_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Pad rows to `length` (default: the longest row).

    Returns input_ids/labels/position_ids (B, T) and segment_ids (B, T): 1..k the row's
    examples, 0 padding. Positions restart at 0 in each example; tuneline.attention turns
    the segment ids into the isolating mask the device computes fastest.
    """
    T = length or max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.zeros((B, T), dtype=torch.long)  # 0 = padding, 1..k = examples
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.as_tensor(r["input_ids"])
        labels[b, :n] = torch.as_tensor(r["labels"])
        start = 0
        for k, L in enumerate(r["seq_lens"], start=1):
            pos[b, start : start + L] = torch.arange(L)
            seg[b, start : start + L] = k
            start += L
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "segment_ids": seg}
