"""MediaWiki XML dumps (`builtin:wikipedia`, `wikidump:<path.xml.bz2>`) as plain-text
paragraphs: pages streamed with a real XML parser (memory stays flat on large dumps), the
wikitext of each chunk of articles parsed to prose by worker processes."""

from __future__ import annotations

import bz2
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

from tuneline import ROOT, assets
from tuneline.errors import TunelineError


def dump_path(spec: str) -> Path:
    if spec == "builtin:wikipedia":
        return assets.wiki_dump()
    path = ROOT / Path(spec.removeprefix("wikidump:")).expanduser()
    if not path.is_file():
        raise TunelineError(f"dump file '{path}' not found", "give an existing MediaWiki XML .bz2 path")
    return path


def plain_text(wikicode) -> str:
    """Wikitext → prose: drop footnotes and tables (strip_code would keep their text)."""
    for tag in wikicode.filter_tags(recursive=False, matches=lambda n: str(n.tag).strip().lower() in ("ref", "table")):
        try:
            wikicode.remove(tag)
        except ValueError:  # already removed with an enclosing node
            pass
    return wikicode.strip_code()


WIKI_CHUNK = 8  # articles per worker and chunk: parsing wikitext is the slow part of prepare


def _pages(path: Path, on_read: Callable[[int], None] | None) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of each main-namespace article, streamed with a real XML parser;
    `on_read(compressed bytes read so far)` after each page."""
    try:
        ns = title = None
        with open(path, "rb") as raw:
            for _, el in ET.iterparse(bz2.open(raw)):
                tag = el.tag.rsplit("}", 1)[-1]
                if tag == "title":
                    title = el.text
                elif tag == "ns":
                    ns = el.text
                elif tag == "text" and ns == "0" and el.text and not el.text.startswith("#REDIRECT"):
                    yield title or "", el.text
                elif tag == "page":
                    el.clear()  # keep memory flat on large dumps
                    if on_read:
                        on_read(raw.tell())
    except (ET.ParseError, OSError, EOFError) as e:
        raise TunelineError(f"cannot read MediaWiki dump '{path}' ({e})", "give a valid .xml.bz2 dump") from None


def _plain(wikitext: str) -> str:
    import mwparserfromhell

    return plain_text(mwparserfromhell.parse(wikitext))


def article_texts(
    path: Path, on_read: Callable[[int], None] | None = None, workers: int | None = None
) -> Iterator[tuple[str, str]]:
    """(title, plain text) of each main-namespace article, in dump order. With several CPUs
    the wikitext of each chunk of articles is parsed by worker processes (one chunk per
    worker in memory at a time); a dump of one chunk is parsed here.

    Workers are forked only from a single-threaded process (a stage's own, as `dvc repro`
    and `tuneline run` start it): a fork copies the locks other threads hold, and a smoke
    run (stages in-process, in Prefect's task threads) hung CI with a forked worker waiting
    forever on the pool's queue lock. There the articles are parsed here."""
    import itertools
    import multiprocessing
    import threading

    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    size = WIKI_CHUNK * max(workers, 1)
    pages, pool = _pages(path, on_read), None
    try:
        while chunk := list(itertools.islice(pages, size)):
            titles, texts = zip(*chunk)
            if pool is None and workers > 1 and len(chunk) == size and threading.active_count() == 1:
                try:
                    pool = multiprocessing.get_context("fork").Pool(workers)  # spawn would re-run a script's __main__
                except (AssertionError, OSError):  # e.g. inside a daemonic process: parse here
                    workers = 1
            plain = pool.map(_plain, texts, chunksize=1) if pool else [_plain(t) for t in texts]
            yield from zip(titles, plain)
    finally:
        if pool is not None:
            pool.terminate()


def paragraphs(path: Path, on_read: Callable[[int], None] | None = None) -> Iterator[tuple[str, str]]:
    for title, text in article_texts(path, on_read):
        for para in text.split("\n"):
            para = " ".join(para.split())
            if para:
                yield title, para
