"""Data sources: one loader per kind of spec, and validation before any heavy work.

Specs:
- `builtin:wikipedia`: the Wikipedia dump sample inside the gensim wheel (offline default);
- `wikidump:<path.xml.bz2>`: a MediaWiki XML dump; rows are plain-text paragraphs;
- `hf:<id>[:config][@revision][#split]`: a hub dataset (split defaults to `train`); the
  resolved commit is recorded;
- a local CSV / TSV / JSON (an array of objects) / JSONL / Parquet file, or a glob of them
  (TSV as GLUE and spreadsheets write it: tabs between fields, no quoting);
- a plain-text corpus: `.txt` files (or a glob), documents separated by blank lines;
- `alpaca-chat:<file>`: Alpaca/Dolly records (any local form above) as conversations
  (`chat.from_alpaca`: one and two turns, with and without a system turn).
  CSV, TSV, JSON, JSONL and text files may be compressed: `.gz`, `.bz2`, `.xz`, `.zst`.

`load` streams: it returns an iterator of batches of at most BATCH_ROWS raw rows, so no
source is ever held whole (a JSON array is the one format parsed in one piece: use JSONL
for large data). tuneline/rows.py turns the raw rows into a task's rows.
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import io
import itertools
import json
import lzma
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from tuneline import located
from tuneline.errors import TunelineError
from tuneline.io import sha256
from tuneline.wikidump import dump_path, paragraphs

LOCAL_FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt")
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")  # read as they are (not .parquet: it compresses inside)
ALPACA_CHAT = "alpaca-chat:"  # `alpaca-chat:<file>`: Alpaca/Dolly records read as conversations
BATCH_ROWS = 8192  # raw rows per batch: memory is bounded by this, not by the source
MAX_DOC_BYTES = 1 << 20  # a text-file block longer than this is cut at a line end

Batches = Iterator[list[dict]]
SCHEME = re.compile(r"^[a-z][a-z0-9+]*:")  # hf:, builtin:, alpaca-chat:, …: a source that is no plain path
_HF = re.compile(r"hf:(?P<id>[^:@#]+)(?::(?P<config>[^@#]+))?(?:@(?P<rev>[^#]+))?(?:#(?P<split>.+))?")


def is_wiki(spec: str) -> bool:
    return spec == "builtin:wikipedia" or spec.startswith("wikidump:")


def from_cwd(spec: str) -> str:
    """`spec` as given on a command line: its relative local path (after an `alpaca-chat:`
    or `wikidump:` prefix) made absolute from the working directory. In params a path is
    relative to the project root; an argument, to where the user typed it."""
    prefix = next((p for p in (ALPACA_CHAT, "wikidump:") if spec.startswith(p)), "")
    path = os.path.expanduser(spec.removeprefix(prefix))
    if not prefix and SCHEME.match(spec) and not os.path.exists(spec):  # hf:, builtin:
        return spec
    # normpath: '../d/x.csv' is printed and recorded as the file it names (getcwd is physical,
    # so dropping '..' textually names the same file the kernel opens)
    return spec if os.path.isabs(path) else prefix + os.path.normpath(os.path.join(os.getcwd(), path))


def load(spec: str, streaming: bool = False, hashes: bool = True) -> tuple[Batches, dict, bool]:
    """(batches of raw rows, lineage {'source', 'revision' or 'sha256'}, is_prose). CSV and
    JSONL rows also carry their file and line under the key LINE (for messages). Prose
    sources (Wikipedia, .txt) give {'text'} rows that `Task.prose` turns into examples.
    `streaming`: read a hub dataset as it downloads instead of caching it whole first.
    `hashes=False` leaves a local file's sha256 out of the lineage (a look at its first rows)."""
    if is_wiki(spec):
        path = dump_path(spec)
        digest = sha256(path)
        return _wiki_batches(spec, path, digest), {"source": spec, "sha256": digest}, True
    if spec.startswith("hf:"):
        return (*_hub(spec, streaming), False)
    if spec.startswith(ALPACA_CHAT):  # Alpaca/Dolly records as conversations (tuneline/chat.py)
        from tuneline.chat import from_alpaca

        batches, lineage, _ = _local(spec.removeprefix(ALPACA_CHAT), hashes)
        return batched(from_alpaca(r for b in batches for r in b)), lineage | {"source": spec}, False
    if SCHEME.match(spec) and not os.path.exists(spec):
        raise TunelineError(
            f"data source '{spec}' is not supported",
            "use builtin:wikipedia, wikidump:<path>, hf:<id>[:config][@rev][#split] or a local file/glob",
        )
    return _local(spec, hashes)


def batched(rows: Iterable[dict], size: int | None = None) -> Batches:
    size = size or BATCH_ROWS
    batch: list[dict] = []
    for r in rows:
        batch.append(r)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _wiki_batches(spec: str, path: Path, digest: str) -> Batches:
    from tuneline import progress

    # Parsing wikitext is the slow part (~15 s for the built-in sample, then cached): follow
    # it by the compressed kB read, the one total known before the end.
    with progress.bar("prepare", max(1, path.stat().st_size >> 10), "kB", what=f"reading {spec}") as b:
        rows = (
            {"title": t, "text": p} for t, p in paragraphs(path, lambda pos: b.advance((pos >> 10) - b.done), digest)
        )
        yield from batched(rows)
        b.advance(b.total - b.done)  # the tail after the last page


# --- the hub ---------------------------------------------------------------------------


def _hub(spec: str, streaming: bool) -> tuple[Batches, dict]:
    m = _HF.fullmatch(spec)
    if not m:
        raise TunelineError(
            f"bad hub source '{spec}'", "write hf:<id>[:config][@revision][#split], e.g. hf:dair-ai/emotion#train"
        )
    ds_id, config, rev, split = m["id"], m["config"], m["rev"], m["split"] or "train"
    # Not streaming, `datasets` caches the split as memory-mapped Arrow, read here in batches.
    try:
        from datasets import load_dataset

        ds = load_dataset(ds_id, config, revision=rev, split=split, streaming=streaming)
    except Exception as e:  # offline, unknown id, unknown split: all surface as different types
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        fix = (
            "the hub is off (HF_HUB_OFFLINE=1): set HF_HUB_OFFLINE=0 with network access, or point the "
            "source at local files"
            if offline
            else "check the dataset id, config, split and your network/HF_TOKEN"
        )
        raise TunelineError(
            f"cannot load hub dataset '{spec}' ({type(e).__name__}: {str(e).splitlines()[0][:100]})", fix
        ) from None
    resolved = rev
    try:
        resolved = hub_revision(spec) or rev
    except Exception:  # the data loaded; a missing commit id only weakens lineage
        pass
    batches = ([dict(zip(b, vals)) for vals in zip(*b.values())] for b in ds.iter(batch_size=BATCH_ROWS))
    return batches, {"source": spec, "revision": resolved or "unknown"}


def hub_revision(spec: str) -> str | None:
    """The commit a hub source resolves to now (its branch head unless @revision pins it).
    Network errors propagate: the caller decides whether to retry."""
    m = _HF.fullmatch(spec)
    if not m:
        raise TunelineError(
            f"bad hub source '{spec}'", "write hf:<id>[:config][@revision][#split], e.g. hf:dair-ai/emotion#train"
        )
    from huggingface_hub import HfApi

    return HfApi().dataset_info(m["id"], revision=m["rev"]).sha


# --- local files -----------------------------------------------------------------------


def local_paths(spec: str) -> list[Path]:
    pattern = os.path.expanduser(spec)
    relative = not os.path.isabs(pattern)
    if relative:  # to the project root, wherever a stage runs (a sweep arm too)
        pattern = str(located(pattern))
    paths = sorted(Path(p) for p in glob.glob(pattern)) if glob.has_magic(pattern) else [Path(pattern)]
    if not paths or not paths[0].exists():
        where = os.path.normpath(pattern)  # the path looked at, when the user gave a relative one
        looked = "" if where == os.path.normpath(spec) else f" (looked for {where})"
        fix = f"check the path{' (relative to the project root)' if relative else ''} or the glob"
        if "shared/data/" in spec:  # a shipped recipe's default source
            fix += "; the recipes' labelled data is read from ../shared/data beside the project, or --set prepare.source=<your copy>"
        raise TunelineError(f"data file '{spec}' not found{looked}", fix)
    return paths


def file_hashes(spec: str) -> str | dict[str, str] | None:
    """What `load` records as the content of a file source, without parsing it (None for the hub)."""
    if spec.startswith("hf:"):
        return None
    if is_wiki(spec):
        return sha256(dump_path(spec))
    return {str(p): sha256(p) for p in local_paths(spec.removeprefix(ALPACA_CHAT))}


def file_format(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression suffix or None) of a local data file, or a clear error."""
    suffixes = [x.lower() for x in path.suffixes[-2:]]
    comp = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSED else None
    ext = (suffixes[-2] if comp and len(suffixes) == 2 else "") if comp else (suffixes[-1] if suffixes else "")
    if ext not in LOCAL_FORMATS or (comp and ext == ".parquet"):
        raise TunelineError(
            f"data file '{path}' has an unsupported format",
            f"use one of: {', '.join(LOCAL_FORMATS)} (text formats may end in {', '.join(COMPRESSED)})",
        )
    return ext, comp


def _glob_for(folder: Path) -> str:
    """A glob of a folder's data files, of its most common readable kind (e.g. '<folder>/*.txt.gz')."""
    from collections import Counter

    kinds = Counter()
    for p in folder.iterdir():
        try:
            ext, comp = file_format(p)
        except TunelineError:  # not a data file (notes.md, a sub-folder)
            continue
        kinds[ext + (comp or "")] += 1
    return f"{folder}/*{kinds.most_common(1)[0][0] if kinds else '.jsonl'}"


def _local(spec: str, hashes: bool = True) -> tuple[Batches, dict, bool]:
    paths = local_paths(spec)
    kinds = set()
    for path in paths:
        if path.is_dir():  # (shown without '..': the folder the user named)
            shown = Path(os.path.normpath(path))
            raise TunelineError(f"data source '{shown}' is a directory", f"name the files, e.g. '{_glob_for(shown)}'")
        kinds.add(file_format(path)[0] == ".txt")
    if len(kinds) > 1:
        raise TunelineError(
            f"data source '{spec}' mixes plain-text (.txt) and table files", "point it at one kind of file"
        )
    lineage = {"source": spec, "sha256": {str(p): sha256(p) for p in paths}} if hashes else {"source": spec}
    return (batch for path in paths for batch in _read(path)), lineage, kinds == {True}


def _open(path: Path) -> IO[bytes]:
    comp = file_format(path)[1]
    if comp == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.open(path, "rb"))  # its reader has no readline of its own
    return {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(comp, open)(path, "rb")


def _lines(path: Path) -> Iterator[str]:
    """Decoded lines (ends kept), one at a time; bad UTF-8 names its line and byte, and an
    Excel byte-order mark is dropped."""
    utf8 = f"{path.stem}.utf8{path.suffix}"  # where the fix's re-encoded copy goes
    try:
        with _open(path) as f:
            for i, raw in enumerate(f, start=1):
                if i == 1 and raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # Excel's "Unicode Text", Notepad's "Unicode"
                    raise TunelineError(
                        f"{path} is UTF-16 (it starts with a UTF-16 byte-order mark), not UTF-8",
                        f"re-encode it as UTF-8, e.g. iconv -f utf-16 -t utf-8 {path} > {utf8}",
                    )
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise TunelineError(
                        f"{path} line {i} is not valid UTF-8 (byte 0x{raw[e.start]:02x})",
                        f"re-encode the file as UTF-8, e.g. iconv -f cp1252 -t utf-8 {path} > {utf8} "
                        "(cp1252: Windows' Western encoding; name the one it was saved in)",
                    ) from None
                yield line.removeprefix("\ufeff") if i == 1 else line
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise TunelineError(f"cannot read {path} ({e})", "check that the file is complete and not corrupt") from None
    except Exception as e:  # zstandard raises its own ZstdError
        if type(e).__name__ != "ZstdError":
            raise
        raise TunelineError(f"cannot read {path} ({e})", "check that the file is complete and not corrupt") from None


def _read(path: Path) -> Batches:
    ext = file_format(path)[0]
    if ext == ".parquet":
        import pyarrow.parquet as pq

        try:  # a row group at a time: iter_batches keeps what it decoded in Arrow's pool
            f = pq.ParquetFile(path)
            for g in range(f.num_row_groups):
                for b in f.read_row_group(g).to_batches(max_chunksize=BATCH_ROWS):
                    yield b.to_pylist()
        except Exception as e:
            raise TunelineError(f"{path} is not a readable Parquet file ({e})", "re-export the file") from None
    elif ext in (".csv", ".tsv"):
        yield from batched(_delimited(path, ext == ".tsv"))
    elif ext == ".jsonl":
        yield from batched(_jsonl(path))
    elif ext == ".txt":
        yield from batched({"text": doc} for doc in documents(_lines(path)))
    else:
        yield from batched(_json_array(path))


def documents(lines: Iterable[str]) -> Iterator[str]:
    """A text file's documents: blocks separated by one or more blank lines, each block's
    lines joined by single spaces (hard-wrapped prose reads as one paragraph). A file with
    no blank line is one document; a block over MAX_DOC_BYTES is cut at a line end."""
    block: list[str] = []
    size = 0
    for line in lines:
        line = line.strip()
        if line:
            block.append(line)
            size += len(line) + 1
        if block and (not line or size > MAX_DOC_BYTES):
            yield " ".join(block)
            block, size = [], 0
    if block:
        yield " ".join(block)


LINE = "\x00line"  # where a row is in its file (CSV, JSONL), for messages; never a column


def _delimited(path: Path, tsv: bool) -> Iterator[dict]:
    """CSV (RFC 4180 quoting, the separator read from the header: `_delimiter`) or TSV rows. A TSV field cannot hold a tab or a line break, and
    a quote is plain text (GLUE's MNLI files have unpaired quotes). A row with fewer or more
    fields than the header is an error: an unclosed quote or a stray comma would otherwise
    shift or merge columns without a word."""
    csv.field_size_limit(sys.maxsize)  # a long text field is data, not an error
    lines = _lines(path)
    first = next(lines, "")
    style = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {"delimiter": _delimiter(first)}
    reader = csv.DictReader(itertools.chain([first] if first else [], lines), **style)
    header = [h.strip() for h in reader.fieldnames or ()]
    twice = next((h for i, h in enumerate(header) if h and h in header[:i]), None)
    if twice is not None:  # DictReader would keep the last one's values without a word
        at = [i + 1 for i, h in enumerate(header) if h == twice]
        raise TunelineError(
            f"{path}: its header names column {twice!r} {len(at)} times (columns {', '.join(map(str, at))})",
            "rename all but one of them",
        )
    for row in reader:
        extra = row.pop(None, None)  # the fields past the header's (DictReader's restkey)
        if None in row.values() or any(x.strip() for x in extra or ()):  # trailing empty fields are harmless
            fields = sum(v is not None for v in row.values()) + len(extra or ())
            raise TunelineError(
                f"{path} line {reader.line_num} has {fields} field{'' if fields == 1 else 's'}, "
                f"but its header has {len(reader.fieldnames)}",
                "a TSV field cannot hold a tab or a line break: fix that row"
                if tsv
                else f"quote a field that holds a {SEPARATORS[style['delimiter']]}, a quote or a line break "
                '("...", a quote inside doubled: ""), and close every quote',
            )
        # line_num after a row is its last line: a row's line in the file, as an editor shows it
        yield row | {LINE: f"{path.name} line {reader.line_num}"}


SEPARATORS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "'|'"}


def _delimiter(header: str) -> str:
    """The separator of a .csv file, read from its header: a comma, or the ';' a European
    Excel saves, the tab of a tab-separated file named .csv, or '|', when the header is one
    field under commas and two or more under that separator. Every row must then have the
    header's number of fields, so a wrong guess is an error, never columns shifted."""
    if len(next(csv.reader([header]), [])) == 1:
        for sep in (";", "\t", "|"):
            if len(next(csv.reader([header], delimiter=sep), [])) > 1:
                return sep
    return ","


def _jsonl(path: Path) -> Iterator[dict]:
    for i, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TunelineError(f"{path} line {i} is not valid JSON ({e.msg})", "fix or remove that line") from None
        if not isinstance(row, dict):
            raise TunelineError(
                f"{path} does not hold JSON objects (one row each)",
                "write a list of objects, or one object per line (.jsonl)",
            )
        row[LINE] = f"{path.name} line {i}"
        yield row


def _json_array(path: Path) -> list[dict]:
    """A JSON array is parsed whole (the one non-streaming format): use JSONL for large data."""
    text = "".join(_lines(path))
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise TunelineError(
            f"{path} is not valid JSON ({e.msg}, line {e.lineno})",
            "fix the file; for one object per line name it .jsonl",
        ) from None
    if not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows)):
        raise TunelineError(
            f"{path} does not hold JSON objects (one row each)",
            "write a list of objects, or one object per line (.jsonl)",
        )
    return rows
