"""Data sources: one loader per kind of spec, and validation before any heavy work.

Specs:
- `builtin:wikipedia`: the Wikipedia dump sample inside the gensim wheel (offline default);
- `wikidump:<path.xml.bz2>`: a MediaWiki XML dump; rows are plain-text paragraphs;
- `hf:<id>[:config][@revision][#split]`: a hub dataset (split defaults to `train`); the
  resolved commit is recorded;
- a local CSV / TSV / JSON / JSONL / Parquet / Arrow / text file, or a glob of them (each
  format is read by tuneline/readers.py);
- a folder `datasets` wrote with `save_to_disk` (one split: a DatasetDict's split folder):
  its Arrow files, in order; ClassLabel ids are read as their names, as from the hub;
- `alpaca-chat:<file>`: Alpaca/Dolly records (any local form above) as conversations
  (`chat.from_alpaca`: one and two turns, with and without a system turn).

`load` streams: it returns an iterator of batches of at most BATCH_ROWS raw rows, so no
source is ever held whole (a JSON array too is decoded object by object, readers._json_objects).
tuneline/rows.py turns the raw rows into a task's rows.
"""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path

from tuneline import located
from tuneline.errors import TunelineError
from tuneline.io import sha256
from tuneline.readers import BATCH_ROWS, Batches, batched, file_format, label_names, read
from tuneline.wikidump import dump_path, paragraphs

ALPACA_CHAT = "alpaca-chat:"  # `alpaca-chat:<file>`: Alpaca/Dolly records read as conversations

SCHEME = re.compile(r"^[a-z][a-z0-9+]*:")  # hf:, builtin:, alpaca-chat:, …: a source that is no plain path
_HF = re.compile(r"hf:(?P<id>[^:@#]+)(?::(?P<config>[^@#]+))?(?:@(?P<rev>[^#]+))?(?:#(?P<split>.+))?")


def is_wiki(spec: str) -> bool:
    return spec == "builtin:wikipedia" or spec.startswith("wikidump:")


def local_part(spec: str) -> tuple[str, str]:
    """(the `alpaca-chat:` or `wikidump:` prefix or '', the path after it, with ~ expanded)."""
    prefix = next((p for p in (ALPACA_CHAT, "wikidump:") if spec.startswith(p)), "")
    return prefix, os.path.expanduser(spec.removeprefix(prefix))


def from_cwd(spec: str) -> str:
    """`spec` as given on a command line: its relative local path (after an `alpaca-chat:`
    or `wikidump:` prefix) made absolute from the working directory. In params a path is
    relative to the project root; an argument, to where the user typed it."""
    prefix, path = local_part(spec)
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
    names = {k: f.names for k, f in (ds.features or {}).items() if type(f).__name__ == "ClassLabel"}
    batches = (
        [label_names(dict(zip(b, vals)), names) for vals in zip(*b.values())] for b in ds.iter(batch_size=BATCH_ROWS)
    )
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
    return [f for p in paths for f in (_saved_dataset(p) if p.is_dir() else None) or [p]]


def _saved_dataset(folder: Path) -> list[Path] | None:
    """The Arrow files of a folder `datasets` wrote with `save_to_disk` (its state.json lists
    them, in order), or None for any other folder. A DatasetDict's folder holds one folder
    per split: the user names the split."""
    shown = Path(os.path.normpath(folder))
    if (folder / "dataset_dict.json").is_file():
        splits = [d.name for d in sorted(folder.iterdir()) if (d / "state.json").is_file()]
        first = "train" if "train" in splits or not splits else splits[0]
        fix = f"name one split's folder, e.g. '{shown / first}'"
        if "test" in splits:
            fix += f", and '{shown / 'test'}' as prepare.test_source"
        raise TunelineError(
            f"data source '{shown}' is a DatasetDict saved by save_to_disk (splits: {', '.join(splits) or 'none'})", fix
        )
    state = folder / "state.json"
    if not state.is_file() or not (folder / "dataset_info.json").is_file():
        return None
    try:
        files = [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise TunelineError(
            f"data source '{shown}': its state.json does not list the data files ({type(e).__name__})",
            "save the dataset again with save_to_disk",
        ) from None
    if missing := [f.name for f in files if not f.is_file()]:
        raise TunelineError(
            f"data source '{shown}' lacks {', '.join(missing)} (listed in its state.json)",
            "copy the whole folder, or save the dataset again with save_to_disk",
        )
    if not files:
        raise TunelineError(
            f"data source '{shown}' holds no rows (state.json lists no files)", "save a non-empty dataset"
        )
    return files


def file_hashes(spec: str) -> str | dict[str, str] | None:
    """What `load` records as the content of a file source, without parsing it (None for the hub)."""
    if spec.startswith("hf:"):
        return None
    if is_wiki(spec):
        return sha256(dump_path(spec))
    return {str(p): sha256(p) for p in local_paths(spec.removeprefix(ALPACA_CHAT))}


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
    return (batch for path in paths for batch in read(path)), lineage, kinds == {True}
