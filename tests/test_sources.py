"""Every source kind loads, and every kind of bad data stops prepare with one clear line."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tuneline
from components import prepare
from tuneline import sources
from tuneline.data import read_split
from tuneline.errors import TunelineError
from tuneline.params_file import parse_params
from tuneline.rows import task_rows
from tuneline.tasks import TASKS

LABELS = ["neg", "pos"]
ROWS = [{"text": f"review number {i}", "label": LABELS[i % 2]} for i in range(30)]


def _write(path, rows):
    ext = path.suffix
    if ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif ext == ".json":
        path.write_text(json.dumps(rows))
    elif ext in (".csv", ".tsv"):
        sep = "," if ext == ".csv" else "\t"
        path.write_text(f"text{sep}label\n" + "".join(f"{r['text']}{sep}{r['label']}\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _rows(batches):
    """The rows' columns (without the file line each CSV/JSONL row carries for messages)."""
    return [{k: v for k, v in r.items() if k != sources.LINE} for batch in batches for r in batch]


def _task_rows(rows, task, columns, labels):
    return _rows(task_rows([rows], TASKS[task], columns, labels, "x"))


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_each_local_format_loads_the_same_rows(tmp_path, ext):
    batches, lineage, prose = sources.load(str(_write(tmp_path / f"d{ext}", ROWS)))
    assert _rows(task_rows(batches, TASKS["classify"], {}, LABELS, "x")) == ROWS and not prose
    assert len(next(iter(lineage["sha256"].values()))) == 64  # file hash recorded for lineage


def test_a_glob_reads_every_matching_file(tmp_path):
    _write(tmp_path / "a.jsonl", ROWS[:10])
    _write(tmp_path / "b.jsonl", ROWS[10:])
    batches, lineage, _ = sources.load(str(tmp_path / "*.jsonl"))
    assert _rows(batches) == ROWS and len(lineage["sha256"]) == 2


def test_a_folder_as_the_source_gets_the_glob_of_its_own_files(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.txt.gz", "b.txt.gz", "c.csv", "notes.md"):
        (corpus / name).write_bytes(b"")
    with pytest.raises(
        TunelineError, match=rf"'{corpus}' is a directory. Fix: name the files, e.g. '{corpus}/\*.txt.gz'$"
    ):
        sources.load(str(corpus))
    with pytest.raises(TunelineError, match=rf"^data source '{corpus}' is a directory"):  # not '…/project/../corpus'
        (tmp_path / "project").mkdir()  # a params path from the project root: '../corpus'
        sources.load(str(tmp_path / "project" / ".." / "corpus"))
    with pytest.raises(TunelineError, match=r"e.g. '.*/empty/\*.jsonl'$"):  # nothing readable in it: an example
        (tmp_path / "empty").mkdir()
        sources.load(str(tmp_path / "empty"))


def test_a_missing_relative_path_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(tuneline, "ROOT", tmp_path / "proj")
    with pytest.raises(TunelineError) as e:
        sources.local_paths("data/x.csv")
    assert str(e.value).startswith(
        f"data file 'data/x.csv' not found (looked for {tmp_path}/proj/data/x.csv). Fix: check the path"
    )
    # A shipped recipe's default source, in a clone without the labelled data beside it
    with pytest.raises(
        TunelineError, match=r"not found \(looked for .*/shared/data/emotion/train.jsonl\).*--set prepare.source="
    ):
        sources.local_paths("../shared/data/emotion/train.jsonl")
    with pytest.raises(TunelineError) as e:
        sources.local_paths(str(tmp_path / "abs.csv"))
    assert str(e.value).startswith(f"data file '{tmp_path}/abs.csv' not found. Fix:") and "--set" not in str(e.value)


def test_a_sweep_arm_reads_a_relative_source_from_the_project_it_was_queued_from(tmp_path, monkeypatch):
    """DVC's queue runs each arm in a copy of the project (.dvc/tmp/exps/…) holding only what
    git tracks: the recipes' `../shared/data/…`, or an untracked data file, is not there.
    Every arm failed at its first stage with "data file … not found"."""
    copy = tmp_path / "proj/.dvc/tmp/exps/tmp1234"
    copy.mkdir(parents=True)
    monkeypatch.setattr(tuneline, "ROOT", copy)
    (tmp_path / "data.csv").write_text("text,label\nhi,pos\n")
    with pytest.raises(TunelineError, match="not found"):  # a stage in the copy, not a queued arm
        sources.local_paths("../data.csv")
    monkeypatch.setenv("DVC_EXP_NAME", "sweep-abc123-1")  # what DVC sets for a queued experiment
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "proj"))
    assert [p.resolve() for p in sources.local_paths("../data.csv")] == [(tmp_path / "data.csv").resolve()]


def test_a_command_lines_data_path_is_taken_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sources.from_cwd("my.csv") == f"{tmp_path}/my.csv"
    assert sources.from_cwd("../d/*.jsonl") == f"{tmp_path.parent}/d/*.jsonl"  # as printed and recorded
    assert sources.from_cwd("alpaca-chat:a.json") == f"alpaca-chat:{tmp_path}/a.json"
    assert sources.from_cwd("wikidump:dump.xml.bz2") == f"wikidump:{tmp_path}/dump.xml.bz2"
    for spec in ("/abs/my.csv", "hf:dair-ai/emotion#train", "builtin:wikipedia", "alpaca-chat:/abs/a.json"):
        assert sources.from_cwd(spec) == spec


def test_hub_source_offline_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TunelineError, match=r"cannot load hub dataset 'hf:dair-ai/emotion#train'.*HF_HUB_OFFLINE"):
        sources.load("hf:dair-ai/emotion#train")


def _prepare(tmp_path, monkeypatch, train_rows, test_rows=None, **over):
    monkeypatch.chdir(tmp_path)
    train = _write(tmp_path / "train.jsonl", train_rows)
    cfg = {"task": "classify", "source": str(train), "labels": LABELS, "n_train": 0, "n_val": 2, "n_test": 2}
    if test_rows is not None:
        cfg |= {"test_source": str(_write(tmp_path / "test.jsonl", test_rows)), "n_test": 0}
    return prepare.run(parse_params({"prepare": cfg | over}))


BAD = [
    (
        "missing column",
        [{"txt": "a", "label": "pos"}] * 5,
        None,
        r"missing column 'text' for the classify task \(it has: 'label', 'txt'\).*did you mean 'txt'.*--set prepare.columns.text=txt,",
    ),
    (
        "wrong type",
        [{"text": 5, "label": "pos"}] * 5,
        None,
        r"column 'text' must be text, but train.jsonl line 1 holds int",
    ),
    (  # a JSON row without the key: said so, not "holds NoneType"
        "row without the column",
        ROWS[:5] + [{"txt": "odd", "label": "pos"}],
        None,
        r"train.jsonl line 6 has no column 'text' \(it has: 'label', 'txt'\)\. Fix: give that row a value",
    ),
    (
        "null value",
        ROWS[:5] + [{"text": None, "label": "pos"}],
        None,
        r"train.jsonl line 6 has no value \(null\) in column 'text'",
    ),
    ("empty split", [], None, r"has no rows"),
    (
        "label outside the set",
        ROWS[:5] + [{"text": "odd", "label": "meh"}],
        None,
        r"train.jsonl line 6 has label 'meh', outside the declared set \['neg', 'pos'\].*add it to prepare.labels",
    ),
    (
        "in two splits",
        ROWS,
        ROWS[:3],
        r"3 examples are in both prepare.source and prepare.test_source.*on_overlap=drop",
    ),
]


@pytest.mark.parametrize("case, rows, test_rows, message", BAD, ids=[b[0] for b in BAD])
def test_bad_data_is_one_clear_line_and_nothing_is_written(tmp_path, monkeypatch, case, rows, test_rows, message):
    with pytest.raises(TunelineError, match=message) as e:
        _prepare(tmp_path, monkeypatch, rows, test_rows)
    assert "\n" not in str(e.value) and "Fix:" in str(e.value)
    assert not (tmp_path / "data/prepared").exists()


def test_invalid_utf8_names_the_line(tmp_path, monkeypatch):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "fine", "label": "pos"}\n{"text": "caf\xe9", "label": "neg"}\n')
    with pytest.raises(TunelineError, match=r"train.jsonl line 2 is not valid UTF-8 \(byte 0xe9\).*iconv"):
        _rows(sources.load(str(path))[0])


def test_a_utf16_file_is_named_as_utf16_with_the_iconv_that_fixes_it(tmp_path):
    """Excel's "Unicode Text" and Notepad's "Unicode" save UTF-16 with a byte-order mark:
    the latin1 re-encoding the UTF-8 error suggests would garble it."""
    path = tmp_path / "train.csv"
    path.write_text("text,label\nfine,pos\n", encoding="utf-16")
    with pytest.raises(
        TunelineError, match=r"train.csv is UTF-16 .*iconv -f utf-16 -t utf-8 .*train.csv > train.utf8.csv"
    ):
        _rows(sources.load(str(path))[0])


def test_overlap_can_be_dropped_from_train_and_test_is_never_trained_on(tmp_path, monkeypatch):
    m = _prepare(tmp_path, monkeypatch, ROWS, ROWS[:3], on_overlap="drop")
    assert m["overlap_dropped_from_train"] == 3 and m["test_rows"] == 3
    train = {r["text"] for r in read_split("train")} | {r["text"] for r in read_split("val")}
    assert not train & {r["text"] for r in read_split("test")}
    assert m["train_rows"] + m["val_rows"] == 27


def test_a_test_source_that_is_the_source_itself_is_named_as_the_cause(tmp_path, monkeypatch):
    """It said only "the train split has 0 rows ... (0 usable rows in the source)"."""
    with pytest.raises(TunelineError) as e:
        _prepare(tmp_path, monkeypatch, ROWS, ROWS, on_overlap="drop")
    assert "after dropping the 30 that prepare.test_source also holds" in str(e.value)
    assert "Fix: point prepare.test_source at other examples, or set prepare.test_source=null" in str(e.value)


def test_duplicates_are_removed_before_the_split(tmp_path, monkeypatch):
    m = _prepare(tmp_path, monkeypatch, ROWS + ROWS[:5])
    assert m["duplicates_removed"] == 5 and m["train_rows"] + m["val_rows"] + m["test_rows"] == 30


def test_an_edited_file_changes_its_recorded_hash(tmp_path):
    path = _write(tmp_path / "d.jsonl", ROWS)
    _, lineage, _ = sources.load(str(path))
    assert sources.file_hashes(str(path)) == lineage["sha256"]  # what the flow compares before prepare
    _write(path, ROWS[:-1])
    assert sources.file_hashes(str(path)) != lineage["sha256"]
    assert sources.file_hashes("hf:dair-ai/emotion") is None  # hub revisions are checked online


CORPUS = [f"Paragraph {i} of the corpus, long enough to keep as a pretraining document." for i in range(40)]


def _compress(path, ext):
    import bz2
    import gzip
    import lzma

    import zstandard

    data = path.read_bytes()
    out = path.with_name(path.name + ext)
    out.write_bytes(
        {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".zst": zstandard.compress}[ext](data)
    )
    return out


def test_a_text_corpus_is_one_document_per_blank_line_separated_block(tmp_path):
    # hard-wrapped lines join into one document; runs of blank lines separate documents
    (tmp_path / "a.txt").write_text("\ufeffFirst document,\nwrapped here.\n\n\n  Second one.\nStill second.\n\nThird")
    batches, _, prose = sources.load(str(tmp_path / "a.txt"))
    assert prose and _rows(batches) == [
        {"text": "First document, wrapped here."},
        {"text": "Second one. Still second."},
        {"text": "Third"},
    ]


@pytest.mark.parametrize("ext", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_files_are_read_as_they_are(tmp_path, ext):
    plain = _write(tmp_path / "d.jsonl", ROWS)
    assert _rows(sources.load(str(_compress(plain, ext)))[0]) == ROWS
    (tmp_path / "c.txt").write_text("\n\n".join(CORPUS))
    assert [r["text"] for r in _rows(sources.load(str(_compress(tmp_path / "c.txt", ext)))[0])] == CORPUS


def test_a_truncated_compressed_file_is_one_clear_line(tmp_path):
    gz = _compress(_write(tmp_path / "d.jsonl", ROWS * 50), ".gz")
    gz.write_bytes(gz.read_bytes()[:200])
    with pytest.raises(TunelineError, match=r"cannot read .*d.jsonl.gz.*not corrupt"):
        _rows(sources.load(str(gz))[0])


def test_a_glob_of_text_files_pretrains_on_every_paragraph(tmp_path, monkeypatch):
    for k in range(4):  # four "books", ten paragraphs each, one of them compressed
        (tmp_path / f"book{k}.txt").write_text("\n\n".join(CORPUS[10 * k : 10 * k + 10]))
    _compress(tmp_path / "book3.txt", ".gz")
    (tmp_path / "book3.txt").unlink()
    monkeypatch.chdir(tmp_path)
    cfg = {"task": "pretrain", "source": str(tmp_path / "book*"), "n_train": 0, "n_val": 4, "n_test": 4}
    cfg["on_overlap"] = "report"  # the paragraphs are made from one template: near duplicates, kept
    m = prepare.run(parse_params({"prepare": cfg}))
    assert m["source_rows"] == 40 and m["train_rows"] == 32
    got = sorted(r["text"] for s in ("train", "val", "test") for r in read_split(s))
    assert got == sorted(CORPUS)


def test_text_and_table_files_do_not_mix(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    _write(tmp_path / "b.jsonl", ROWS)
    with pytest.raises(TunelineError, match="mixes plain-text"):
        sources.load(str(tmp_path / "*"))


def test_a_csv_with_a_byte_order_mark_and_a_long_field_loads(tmp_path):
    long = "word " * 40_000  # 200k characters: over the csv module's default field limit
    (tmp_path / "d.csv").write_text(f"\ufefftext,label\n{long},pos\nshort,neg\n")
    rows = _task_rows(_rows(sources.load(str(tmp_path / "d.csv"))[0]), "classify", {}, LABELS)
    assert rows == [{"text": long, "label": "pos"}, {"text": "short", "label": "neg"}]


def test_a_tsv_reads_quotes_as_text_as_glue_writes_them(tmp_path):
    # MNLI's dev_matched.tsv: unpaired quotes in the sentences, no quoting anywhere
    (tmp_path / "d.tsv").write_text('text\tlabel\n"Yes," he said\tpos\n5" of rain, then "more\tneg\n')
    rows = _task_rows(_rows(sources.load(str(tmp_path / "d.tsv"))[0]), "classify", {}, LABELS)
    assert rows == [{"text": '"Yes," he said', "label": "pos"}, {"text": '5" of rain, then "more', "label": "neg"}]


@pytest.mark.parametrize(
    "name, text, says",
    [
        # an unclosed quote swallows the rest of the file into one field
        (
            "d.csv",
            'text,label\nfine,pos\n"unclosed,neg\nmore,pos\n',
            r"d.csv line 4 has 1 field, but its header has 2.*close every quote",
        ),
        # an unquoted comma in the text pushes the label into a third field
        (
            "d.csv",
            "text,label\nfine,pos\nhello, world,neg\n",
            r"d.csv line 3 has 3 fields, but its header has 2.*quote a field",
        ),
        ("d.tsv", "text\tlabel\nfine\tpos\na\ttab\tneg\n", r"d.tsv line 3 has 3 fields.*cannot hold a tab"),
        ("d.tsv", "text\tlabel\nno label here\n", r"d.tsv line 2 has 1 field, but its header has 2"),
        # two columns of one name: DictReader kept the last one's values without a word
        ("d.csv", "text,label,text\na,pos,b\n", r"d.csv: its header names column 'text' 2 times \(columns 1, 3\)"),
    ],
)
def test_a_row_whose_fields_do_not_match_the_header_names_its_line(tmp_path, name, text, says):
    (tmp_path / name).write_text(text)
    with pytest.raises(TunelineError, match=says):
        _rows(sources.load(str(tmp_path / name))[0])


@pytest.mark.parametrize("sep", [";", "\t", "|"], ids=["semicolon", "tab", "pipe"])
def test_a_csv_separated_otherwise_than_by_commas_is_read_by_its_headers_separator(tmp_path, sep):
    """European Excel saves ';'-separated .csv files; a tab-separated file is often named
    .csv. Read as comma-separated, each would be one column named 'text;label'."""
    text = f'text{sep}label\nhello, world{sep}pos\n"quoted{sep} and, so on"{sep}neg\n'
    (tmp_path / "d.csv").write_text(text)
    rows = _task_rows(_rows(sources.load(str(tmp_path / "d.csv"))[0]), "classify", {}, LABELS)
    assert rows == [{"text": "hello, world", "label": "pos"}, {"text": f"quoted{sep} and, so on", "label": "neg"}]


def test_a_row_that_breaks_the_headers_separator_names_it(tmp_path):
    (tmp_path / "d.csv").write_text("text;label\nfine;pos\nsemi; colon;neg\n")
    with pytest.raises(TunelineError, match=r"d.csv line 3 has 3 fields, but its header has 2.*holds a semicolon"):
        _rows(sources.load(str(tmp_path / "d.csv"))[0])


def test_trailing_empty_fields_are_harmless(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nfine,pos,,\n")  # a spreadsheet's empty columns
    assert _rows(sources.load(str(tmp_path / "d.csv"))[0]) == [{"text": "fine", "label": "pos"}]
    (tmp_path / "e.csv").write_text("text,label,,\nfine,pos,,\n")  # and their empty names
    assert [(r["text"], r["label"]) for r in _rows(sources.load(str(tmp_path / "e.csv"))[0])] == [("fine", "pos")]
