"""MediaWiki XML dumps (`builtin:wikipedia`, `wikidump:<path.xml.bz2>`) as plain-text
paragraphs: pages streamed with a real XML parser (memory stays flat on large dumps), the
wikitext of each chunk of articles parsed to prose by worker processes.

Parsing wikitext is most of prepare's time (10-15 s for the built-in sample, hours for a
full dump), and its result depends only on the dump's bytes and the parser. So the parsed
articles are kept once per dump in `.cache/wikitext/` (keyed by the dump's sha256 and both
parsers' versions; written to a temporary file and renamed when the whole dump has been
parsed, so a crash or an early stop never leaves a partial one), and a re-run of prepare
with other params reads them back. Change PARSE_VERSION whenever `plain_text` changes what it returns."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

from tuneline import assets, located
from tuneline.errors import TunelineError


def dump_path(spec: str) -> Path:
    if spec == "builtin:wikipedia":
        return assets.wiki_dump()
    path = located(spec.removeprefix("wikidump:"))
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


PARSE_VERSION = 1  # bump when plain_text's output changes: cached parses are then not reused
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

    Workers are spawned (fresh interpreters that import this module), never forked: a fork
    copies the locks other threads hold at that instant, and a stage process always has
    threads that `threading` does not list (torch's, pyarrow's jemalloc background thread).
    Forking hung CI twice: from a smoke run's Prefect task thread, and once, with no Python
    thread but those, in the SIGKILL fault test (not reproduced since: those threads are the
    likely cause, and spawning removes the whole class). Spawned workers also started
    faster here (prepare 9.1 s against 10.4 s on the Wikipedia sample, identical splits).
    As with any spawn, a script that calls this must guard its top level with
    `if __name__ == "__main__":` (the stages run as `python -m tuneline.stages`, which is)."""
    import gc
    import itertools
    import multiprocessing
    import signal
    import traceback

    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    size = WIKI_CHUNK * max(workers, 1)
    pages, pool = _pages(path, on_read), None
    try:
        while chunk := list(itertools.islice(pages, size)):
            titles, texts = zip(*chunk)
            if pool is None and workers > 1 and len(chunk) == size:
                try:
                    # Ctrl-C reaches the workers too (one process group): only we answer it
                    pool = multiprocessing.get_context("spawn").Pool(
                        workers, signal.signal, (signal.SIGINT, signal.SIG_IGN)
                    )
                except (AssertionError, OSError):  # e.g. inside a daemonic process: parse here
                    workers = 1
            plain = pool.map(_plain, texts, chunksize=1) if pool else [_plain(t) for t in texts]
            yield from zip(titles, plain)
    except BaseException as e:
        # The frames this passed through below us (pool.map's) hold the pool: cleared, so that
        # it can be collected below (the frames' lines stay in the traceback).
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
            # Its queues' semaphores are released when it is collected. An interrupted stage
            # exits at once (os._exit), and the resource tracker then warned of "6 leaked
            # semaphore objects" under the stage's error line.
            pool = None
            gc.collect()


def cache_path(sha256: str) -> Path:
    """Where the parse of the dump with this sha256 is kept: by our parser's version and the
    installed mwparserfromhell's, so that either changing parses again."""
    from importlib.metadata import version

    from tuneline.modeling import cache_dir

    return cache_dir().parent / "wikitext" / f"{sha256}-v{PARSE_VERSION}-mw{version('mwparserfromhell')}.jsonl.gz"


def cached_article_texts(
    path: Path, sha256: str, on_read: Callable[[int], None] | None = None
) -> Iterator[tuple[str, str]]:
    """article_texts, read from the parse cache when this dump was parsed before, else
    parsed and kept there (one JSON [title, text] line per article, gzip level 1).
    `on_read` gets dump bytes (scaled from the cache file's position when reading it back)."""
    done = cache_path(sha256)
    if done.is_file():
        size, dump_size = done.stat().st_size, path.stat().st_size
        with open(done, "rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            for line in f:
                title, text = json.loads(line)
                yield title, text
                if on_read:
                    on_read(raw.tell() * dump_size // max(size, 1))
        return
    tmp = done.with_name(f".{done.name}.tmp{os.getpid()}")
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        _drop_orphans(done)
        out = gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1)
    except OSError:  # a read-only cache: parse without keeping it
        yield from article_texts(path, on_read)
        return
    try:
        with out:
            for title, text in article_texts(path, on_read):
                out.write(json.dumps([title, text], ensure_ascii=False) + "\n")
                yield title, text
        tmp.replace(done)  # only a whole parse becomes the cache
    finally:
        tmp.unlink(missing_ok=True)


def _drop_orphans(done: Path) -> None:
    """Remove the partial parses of `done` that a killed process left (its pid is gone); a
    live one is another process parsing the same dump, and is left alone."""
    for part in done.parent.glob(f".{done.name}.tmp*"):
        pid = part.name.rsplit(".tmp", 1)[-1]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            part.unlink(missing_ok=True)
        except (ValueError, PermissionError):  # not ours to judge
            pass


def paragraphs(
    path: Path, on_read: Callable[[int], None] | None = None, sha256: str | None = None
) -> Iterator[tuple[str, str]]:
    """(title, paragraph) of each article, whitespace-normalised; with the dump's `sha256`,
    through the parse cache."""
    texts = cached_article_texts(path, sha256, on_read) if sha256 else article_texts(path, on_read)
    for title, text in texts:
        for para in text.split("\n"):
            para = " ".join(para.split())
            if para:
                yield title, para
