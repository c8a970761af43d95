"""prepare: clean sentences from a MediaWiki dump, scramble them, split, write Parquet.

Outputs data/prepared/{train,val,test}.parquet with columns `source` (scrambled words)
and `target` (the sentence). Sentences are de-duplicated *before* splitting, so no
sentence can appear in two splits.
"""

from __future__ import annotations

import bz2
import random
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from tuneline import assets, tasks
from tuneline.config import Params
from tuneline.errors import TunelineError
from tuneline.io import atomic_dir, read_parquet, write_json

OUT = Path("data/prepared")
METRICS = Path("metrics/prepare.json")
SPLITS = ("train", "val", "test")

# A clean sentence: starts with a capital, plain words and light punctuation, ends with '.'
_CLEAN = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'\"()\-]*[a-z0-9)]\.$")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def dump_path(source: str) -> Path:
    if source == "builtin:wikipedia":
        return assets.wiki_dump()
    if source.startswith("wikidump:"):
        path = Path(source.removeprefix("wikidump:")).expanduser()
        if not path.is_file():
            raise TunelineError(f"prepare.source: dump file '{path}' not found", "give an existing MediaWiki XML .bz2 path")
        return path
    raise TunelineError(f"prepare.source '{source}' is not supported", "use 'builtin:wikipedia' or 'wikidump:<path.xml.bz2>'")


def plain_text(wikicode) -> str:
    """Wikitext → prose: drop footnotes and tables (strip_code would keep their text)."""
    for tag in wikicode.filter_tags(recursive=False, matches=lambda n: str(n.tag).strip().lower() in ("ref", "table")):
        try:
            wikicode.remove(tag)
        except ValueError:  # already removed with an enclosing node
            pass
    return wikicode.strip_code()


def article_texts(path: Path) -> Iterator[str]:
    """Plain text of each main-namespace article, streamed with a real XML parser."""
    import mwparserfromhell

    try:
        ns = None
        for _, el in ET.iterparse(bz2.open(path)):
            tag = el.tag.rsplit("}", 1)[-1]
            if tag == "ns":
                ns = el.text
            elif tag == "text" and ns == "0" and el.text and not el.text.startswith("#REDIRECT"):
                yield plain_text(mwparserfromhell.parse(el.text))
            elif tag == "page":
                el.clear()  # keep memory flat on large dumps
    except (ET.ParseError, OSError, EOFError) as e:
        raise TunelineError(f"cannot read MediaWiki dump '{path}' ({e})", "give a valid .xml.bz2 dump") from None


def clean_sentences(texts: Iterator[str], min_words: int, max_words: int) -> list[str]:
    """Unique sentences in first-seen order, min_words..max_words long."""
    seen: dict[str, None] = {}
    for text in texts:
        for para in text.split("\n"):
            para = " ".join(para.split())
            for sent in _SPLIT.split(para):
                n = len(sent.split())
                if min_words <= n <= max_words and _CLEAN.match(sent) and "  " not in sent:
                    seen.setdefault(sent)
    return list(seen)


def run(params: Params) -> dict:
    cfg = params.prepare
    sentences = clean_sentences(article_texts(dump_path(cfg.source)), cfg.min_words, cfg.max_words)
    need = cfg.n_train + cfg.n_val + cfg.n_test
    print(f"[prepare] {len(sentences)} clean sentences of {cfg.min_words}-{cfg.max_words} words", flush=True)
    if len(sentences) < need:
        raise TunelineError(
            f"prepare: only {len(sentences)} clean sentences, but n_train+n_val+n_test = {need}",
            "lower prepare.n_train/n_val/n_test or widen min_words/max_words")
    rng = random.Random(params.seed)
    rng.shuffle(sentences)
    bounds = {"test": (0, cfg.n_test), "val": (cfg.n_test, cfg.n_test + cfg.n_val),
              "train": (cfg.n_test + cfg.n_val, need)}
    metrics = {"sentences_available": len(sentences)}
    with atomic_dir(OUT) as tmp:
        for split in SPLITS:
            lo, hi = bounds[split]
            targets = sentences[lo:hi]
            split_rng = random.Random(f"{params.seed}-{split}")  # stable per split
            sources = [tasks.scramble(t, split_rng) for t in targets]
            pq.write_table(pa.table({"source": sources, "target": targets}), tmp / f"{split}.parquet")
            metrics[f"{split}_rows"] = len(targets)
            metrics[f"{split}_mean_words"] = sum(len(t.split()) for t in targets) / len(targets)
    write_json(METRICS, metrics)
    return metrics


def read_split(split: str, root: Path = OUT) -> list[dict]:
    return read_parquet(root / f"{split}.parquet", "prepare")
