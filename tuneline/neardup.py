"""Near duplicates between the training rows and the val/test rows: the leakage that the
exact (case- and space-normalised) de-duplication in splits.py lets through, such as a
test sentence that differs from a training sentence by one word or one comma.

An example's *shingles* are the word unigrams and bigrams of its key text, lower-cased with
punctuation dropped (so case and punctuation changes give the same set). Two examples are
near duplicates when the Jaccard similarity of their shingle sets reaches
`prepare.near_dup_threshold`. With n words and one word changed, that similarity is
(2n-4)/(2n+2): 0.57 for a 6-word sentence, 0.86 for 20 words; unrelated sentences that
share only function words score far lower.

Finding the pairs at corpus scale is MinHash LSH (rensa, Rust): the val/test rows, which
are few, are indexed; each training candidate is sketched and looked up, a batch at a
time. The LSH banding is chosen so that a pair at the threshold is a candidate with
probability >= 0.995; every candidate is then checked with its exact Jaccard similarity, so
the verdicts (and the prepared data) do not depend on the sketch. Memory: the index and
the texts of the val/test rows, and one batch.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from tuneline import tasks

NUM_PERM = 128  # MinHash permutations at most (bands x rows per band)
RECALL = 0.995  # chance that a pair exactly at the threshold becomes an LSH candidate
SET_CACHE = 8192  # held-out shingle sets kept between checks (~4 KB each for a tweet)
SEED = 20260101  # the MinHash seed: fixed, so a re-run finds the same candidates
_WORD = re.compile(r"\w+")


def key_text(row: dict, task: tasks.Task) -> str:
    """The text that makes an example what it is: its key columns (a conversation's message
    contents, not its JSON)."""
    if task.chat:
        return "\n".join(m["content"] for m in json.loads(row["messages"]))
    return "\n".join(row[k] for k in task.key)


def tokens(text: str) -> list[str]:
    """Word unigrams and bigrams of the lower-cased text, punctuation dropped (repeats kept:
    a sketch does not mind them, and most rows are never compared exactly)."""
    w = _WORD.findall(text.lower())
    return w + list(map(" ".join, zip(w, w[1:])))


def shingles(text: str) -> set[str]:
    """The shingle set whose Jaccard similarity is the measure."""
    return set(tokens(text))


def jaccard(a: set[str], b: set[str]) -> float:
    if not (a or b):
        return 0.0
    shared = len(a & b)  # |a | b| from the sizes: no union set built
    return shared / (len(a) + len(b) - shared)


def banding(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows per band) with the most rows per band (the fewest false candidates) that
    still makes a pair at `threshold` a candidate with probability >= RECALL."""
    best = (num_perm, 1)
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if 1 - (1 - threshold**r) ** b >= RECALL:
            best = (b, r)
    return best


@dataclass(frozen=True)
class Pair:
    train: int  # the training candidate's row index in the source
    other: int  # the val/test row's key (what `Index.add` was given)
    similarity: float  # exact Jaccard similarity of the shingle sets


class Index:
    """The val/test rows' MinHash sketches in an LSH index, and their texts."""

    def __init__(self, threshold: float):
        import rensa

        self.threshold = threshold
        bands, rows = banding(threshold)
        self.num_perm = bands * rows
        self.lsh = rensa.RMinHashLSH(threshold=threshold, num_perm=self.num_perm, num_bands=bands)
        # Texts, not shingle sets (a set costs ~20x its text). A candidate's set is built
        # when it is checked, and the last SET_CACHE sets are kept: the few held-out rows
        # that share common phrases come up again and again (on the emotion tweets, 42k
        # checks against 2k rows), and rebuilding their sets was most of the audit's time.
        self.texts: dict[int, str] = {}
        self._set = functools.lru_cache(maxsize=SET_CACHE)(lambda k: shingles(self.texts[k]))

    def _sketches(self, docs: list[list[str]]):
        import rensa

        return rensa.RMinHash.from_token_sets(docs, num_perm=self.num_perm, seed=SEED)

    def add(self, items: Iterable[tuple[int, str]]) -> None:
        """Index (key, text) pairs; a text without words cannot be a near duplicate."""
        items = [(k, t, s) for k, t in items if (s := tokens(t))]
        for (k, t, _), m in zip(items, self._sketches([s for _, _, s in items])):
            self.lsh.insert(k, m)
            self.texts[k] = t

    def query(self, items: list[tuple[int, str]]) -> list[Pair]:
        """For a batch of (row index, text): each row's most similar indexed row, where that
        similarity reaches the threshold."""
        if not self.texts:
            return []
        items = [(i, s) for i, t in items if (s := tokens(t))]
        found = []
        for (i, s), cands in zip(items, self.lsh.query_all(self._sketches([s for _, s in items]))):
            if not cands:  # nearly every row: no set is built
                continue
            s = set(s)
            best = max((jaccard(s, self._set(k)), -k) for k in cands)
            if best[0] >= self.threshold:
                found.append(Pair(i, -best[1], best[0]))
        return found
