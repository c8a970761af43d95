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
for large data). `task_rows` maps columns, checks types and labels, and fails on the first
bad row with one line naming the file, the row and the fix.
"""

from __future__ import annotations

import bz2
import csv
import difflib
import glob
import gzip
import io
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
from tuneline.tasks import Task
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
    return spec if os.path.isabs(path) else prefix + os.path.join(os.getcwd(), path)


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
        if path.is_dir():
            raise TunelineError(f"data source '{path}' is a directory", f"name the files, e.g. '{_glob_for(path)}'")
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
    try:
        with _open(path) as f:
            for i, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise TunelineError(
                        f"{path} line {i} is not valid UTF-8 (byte 0x{raw[e.start]:02x})",
                        "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8",
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
    """CSV (RFC 4180 quoting) or TSV rows. A TSV field cannot hold a tab or a line break, and
    a quote is plain text (GLUE's MNLI files have unpaired quotes). A row with fewer or more
    fields than the header is an error: an unclosed quote or a stray comma would otherwise
    shift or merge columns without a word."""
    csv.field_size_limit(sys.maxsize)  # a long text field is data, not an error
    style = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
    reader = csv.DictReader(_lines(path), **style)
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
                else 'quote a field that holds a comma, a quote or a line break ("...", a quote inside doubled: ""), '
                "and close every quote",
            )
        # line_num after a row is its last line: a row's line in the file, as an editor shows it
        yield row | {LINE: f"{path.name} line {reader.line_num}"}


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


# --- validation ------------------------------------------------------------------------


def task_source(spec: str, prepare, where: str, hashes: bool = True) -> tuple[Batches, dict]:
    """Batches of validated task rows of one source under the `prepare` params, plus its
    lineage (`hashes`: with the local files' sha256, which reads them whole)."""
    from tuneline.tasks import TASKS

    task = TASKS[prepare.task]
    raw, lineage, prose = load(spec, streaming=prepare.hub_streaming, hashes=hashes)
    if prose:  # sentences for descramble, paragraphs for pretraining
        if task.prose is None:
            raise TunelineError(
                f"{where} '{spec}' is prose, but task '{task.name}' needs labelled rows",
                "use a file or hub dataset with the task's columns",
            )
        raw = (task.prose([r["text"] for r in batch], prepare.min_words, prepare.max_words) for batch in raw)
    return task_rows(raw, task, prepare.columns, prepare.labels, f"{where} '{spec}'"), lineage


def task_rows(
    batches: Iterable[list[dict]], task: Task, columns: dict[str, str], labels: list[str], where: str
) -> Batches:
    """Batches of rows with exactly the task's columns, all text, labels checked against
    `labels`; the column mapping is settled on the first batch."""
    names: dict[str, str | None] | None = None
    start = 0
    for rows in batches:
        if not rows:
            continue
        if names is None:
            names = _column_names(rows, task, columns, where)
        yield [_task_row(r, names, task, labels, where, start + i) for i, r in enumerate(rows)]
        start += len(rows)
    if names is None:
        raise TunelineError(f"{where} has no rows", "point it at a file or split with data")


def _plain_name(name: str) -> str:
    """A column name as it reads: Unicode-normalised, without invisible characters
    (zero-width spaces, a byte-order mark) or surrounding spaces, as spreadsheets leave them."""
    import unicodedata

    visible = "".join(c for c in unicodedata.normalize("NFKC", name) if unicodedata.category(c) != "Cf")
    return visible.strip()


def _column_names(rows: list[dict], task: Task, columns: dict[str, str], where: str) -> dict[str, str | None]:
    keys: set[str] = set().union(*(r.keys() for r in rows[:1000])) - {LINE}
    plain = {_plain_name(k): k for k in keys if isinstance(k, str)}
    names: dict[str, str | None] = {}
    for col in task.columns:
        name = columns.get(col, col)
        if name not in keys and name in plain:  # 'target ' or 'target\u200b' is the column meant
            print(f"[prepare] {where}: reading column {plain[name]!r} as '{name}'", flush=True)
            name = plain[name]
        if name not in keys:
            alias = dict(task.aliases).get(col)
            name = alias if alias in keys and col not in columns else None
            if name is None and col not in task.optional:
                wanted = columns.get(col, col)
                have = ", ".join(repr(k) for k in sorted(keys, key=str)[:12])  # repr: invisible characters show
                close = difflib.get_close_matches(wanted, [str(k) for k in keys], n=1)
                fix = f"rename the column, or map one with --set prepare.columns.{col}=<column>"
                if close:  # the command to run, with the name filled in
                    fix = f"did you mean {close[0]!r}? map it with --set prepare.columns.{col}={close[0]}, or rename it"
                raise TunelineError(
                    f"{where}: missing column {wanted!r} for the {task.name} task (it has: {have})", fix
                )
        names[col] = name
    return names


def _at(r: dict, i: int) -> str:
    """Where row i is: its file line (CSV, JSONL), else its 1-based row number."""
    return r.get(LINE) or f"row {i + 1}"


_FILL = "give that row a value in the column, or remove the row"


def _task_row(r: dict, names: dict[str, str | None], task: Task, labels: list[str], where: str, i: int) -> dict:
    row = {}
    for col, name in names.items():
        v = r.get(name) if name else None
        if v is None and (col in task.optional or name is None):
            v = ""
        elif v is None:  # a JSON row without the key, or with null: say so, not "holds NoneType"
            if name in r:
                raise TunelineError(f"{where}: {_at(r, i)} has no value (null) in column '{name}'", _FILL)
            have = ", ".join(repr(k) for k in sorted((k for k in r if k != LINE), key=str)[:12])
            raise TunelineError(f"{where}: {_at(r, i)} has no column '{name}' (it has: {have or 'none'})", _FILL)
        if col == "label":
            v = _label(v, labels, where, _at(r, i), name)
        elif task.chat and col == "messages":
            from tuneline.chat import conversation

            v = conversation(v, f"{where}: {_at(r, i)}")
        elif not isinstance(v, str):
            raise TunelineError(
                f"{where}: column '{name}' must be text, but {_at(r, i)} holds {type(v).__name__} {str(v)[:40]!r}",
                "convert that column to strings, or map another column in prepare.columns",
            )
        row[col] = v
    return row


def _label(v, labels: list[str], where: str, at: str, name: str | None) -> str:
    if isinstance(v, str) and v in labels:
        return v
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(labels):
        return labels[v]
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise TunelineError(
            f"{where}: column '{name}' must be a label name or id, but {at} holds {type(v).__name__} {v!r}",
            "convert labels to strings or integer ids",
        )
    near = [lab for lab in labels if isinstance(v, str) and _plain_name(v).casefold() == lab.casefold()]
    near = near or difflib.get_close_matches(str(v), labels, n=1, cutoff=0.75)
    if near:
        fix = f"did you mean {near[0]!r}? Correct that value in the file"
    else:
        fix = "add it to prepare.labels, or drop such rows (e.g. -1 marks unlabelled GLUE test rows)"
    raise TunelineError(f"{where}: {at} has label {v!r}, outside the declared set {labels}", fix)
