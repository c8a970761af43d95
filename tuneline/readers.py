"""Local data files read as rows, one format at a time, streamed in batches.

CSV (RFC 4180 quoting, the separator read from the header), TSV (as GLUE and spreadsheets
write it: no quoting), JSON (an array of objects, the one format parsed whole), JSONL,
Parquet (a row group at a time), Arrow IPC (memory-mapped: `datasets`' cache and
save_to_disk files) and plain text (documents separated by blank lines). Text formats may
be compressed. Files are UTF-8; another encoding is one line with the iconv that fixes it.
Which files a source names is tuneline/sources.py's business.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import io
import itertools
import json
import lzma
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from tuneline.errors import TunelineError

LOCAL_FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".arrow", ".txt")
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")  # read as they are (not .parquet/.arrow: binary, memory-mapped)
BATCH_ROWS = 8192  # raw rows per batch: memory is bounded by this, not by the source
MAX_DOC_BYTES = 1 << 20  # a text-file block longer than this is cut at a line end

Batches = Iterator[list[dict]]


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


def label_names(row: dict, names: dict[str, list[str]]) -> dict:
    """A `datasets` ClassLabel column's ids as the names they stand for, so a recipe's
    prepare.labels need not list them in the dataset's order. An id out of range (GLUE's -1
    for an unlabelled row) stays an id, for prepare to report."""
    for col, labels in names.items():
        v = row.get(col)
        if isinstance(v, int) and 0 <= v < len(labels):
            row[col] = labels[v]
    return row


def file_format(path: Path) -> tuple[str, str | None]:
    """(format suffix, compression suffix or None) of a local data file, or a clear error."""
    suffixes = [x.lower() for x in path.suffixes[-2:]]
    comp = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSED else None
    ext = (suffixes[-2] if comp and len(suffixes) == 2 else "") if comp else (suffixes[-1] if suffixes else "")
    if ext not in LOCAL_FORMATS or (comp and ext in (".parquet", ".arrow")):
        raise TunelineError(
            f"data file '{path}' has an unsupported format",
            f"use one of: {', '.join(LOCAL_FORMATS)} (text formats may end in {', '.join(COMPRESSED)})",
        )
    return ext, comp


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


def read(path: Path) -> Batches:
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
    elif ext == ".arrow":
        yield from batched(_arrow(path))
    elif ext in (".csv", ".tsv"):
        yield from batched(_delimited(path, ext == ".tsv"))
    elif ext == ".jsonl":
        yield from batched(_jsonl(path))
    elif ext == ".txt":
        yield from batched({"text": doc} for doc in documents(_lines(path)))
    else:
        yield from batched(_json_objects(path))


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


def _arrow(path: Path) -> Iterator[dict]:
    """Rows of an Arrow IPC file, memory-mapped: the stream format `datasets` writes (its
    cache and save_to_disk), or the random-access file format. ClassLabel names come from
    the dataset_info.json beside it, when there is one."""
    import pyarrow as pa

    info = path.parent / "dataset_info.json"
    names = {}
    if info.is_file():
        with contextlib.suppress(ValueError, AttributeError):
            features = json.loads(info.read_text()).get("features") or {}
            names = {
                k: v["names"] for k, v in features.items() if isinstance(v, dict) and v.get("_type") == "ClassLabel"
            }
    try:
        with pa.memory_map(str(path)) as src:
            try:
                reader = pa.ipc.open_stream(src)
                batches = iter(reader)
            except pa.ArrowInvalid:  # not a stream: the file format (a footer, random access)
                src.seek(0)
                reader = pa.ipc.open_file(src)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            for b in batches:
                yield from (label_names(r, names) for r in b.to_pylist())
    except (pa.ArrowInvalid, OSError) as e:
        raise TunelineError(f"{path} is not a readable Arrow file ({e})", "re-export the file") from None


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


JSON_READ_AHEAD = 1 << 20  # characters read before each try at decoding the next row
JSON_SPACE = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def _json_objects(path: Path) -> Iterator[dict]:
    """A JSON array of objects (or objects one after another: JSON Lines in a `.json` file,
    as `datasets`' `to_json` writes them), decoded one object at a time as the file's lines
    arrive (`raw_decode` over a buffer): memory holds the rows being read, not the file.
    ShareGPT and OpenHermes ship one JSON array of a gigabyte or more."""
    lines, decoder = _lines(path), json.JSONDecoder()
    buf, pos, line0, eof = "", 0, 1, False  # buf[pos:] is unread; buf starts on line line0

    def fill(n: int = JSON_READ_AHEAD) -> None:  # drop what was read, then read n more characters (or to the end)
        nonlocal buf, pos, line0, eof
        line0 += buf.count("\n", 0, pos)
        parts, size = [buf[pos:]], 0
        while size < n and not eof:
            line = next(lines, None)
            eof = line is None
            if line is not None:
                parts.append(line)
                size += len(line)
        buf, pos = "".join(parts), 0

    def token() -> str:  # the next non-space character ('' at the end), read up to it
        nonlocal pos
        while True:
            pos = JSON_SPACE.match(buf, pos).end()
            if pos < len(buf) or eof:
                return buf[pos : pos + 1]
            fill()

    def invalid(msg: str, at: int) -> TunelineError:
        line = line0 + buf.count("\n", 0, at)
        return TunelineError(
            f"{path} is not valid JSON ({msg}, line {line})",
            "fix the file: a .json file holds a list of objects, or one object per line",
        )

    not_rows = TunelineError(
        f"{path} does not hold JSON objects (one row each)", "write a list of objects, or one object per line (.jsonl)"
    )
    first = token()
    if first not in ("[", "{"):
        raise not_rows if first else invalid("Expecting value", pos)
    jsonl = first == "{"  # one object after another: JSON Lines named .json, as `Dataset.to_json` writes them
    if not jsonl:
        pos += 1
    while jsonl or token() != "]":
        more = JSON_READ_AHEAD
        while True:  # decode the next row, reading on (twice as far each time) while the buffer cuts it off
            try:
                row, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as e:
                if eof:
                    raise invalid(e.msg, e.pos) from None
                fill(more)
                more *= 2
        if not isinstance(row, dict):
            raise not_rows
        pos = end
        yield row
        after = token()
        if jsonl and not after:
            return
        if not jsonl and after != "]":
            if after != ",":
                raise invalid("Expecting ',' delimiter" if after else "Expecting ']'", pos)
            pos += 1
    pos += 1  # the closing ]
    if token():
        raise invalid("Extra data", pos)
