"""Each local file format is read as its writers write it (tuneline/readers.py), and a
file that cannot be read is one line that names the file, the line and the fix."""

import pytest
from test_sources import CORPUS, LABELS, ROWS, _compress, _rows, _task_rows, _write

from tuneline import readers
from tuneline.errors import TunelineError


def test_invalid_utf8_names_the_line(tmp_path, monkeypatch):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "fine", "label": "pos"}\n{"text": "caf\xe9", "label": "neg"}\n')
    with pytest.raises(TunelineError, match=r"train.jsonl line 2 is not valid UTF-8 \(byte 0xe9\).*iconv"):
        _rows(readers.read(path))


def test_a_utf16_file_is_named_as_utf16_with_the_iconv_that_fixes_it(tmp_path):
    """Excel's "Unicode Text" and Notepad's "Unicode" save UTF-16 with a byte-order mark:
    the cp1252 re-encoding the UTF-8 error suggests would garble it."""
    path = tmp_path / "train.csv"
    path.write_text("text,label\nfine,pos\n", encoding="utf-16")
    with pytest.raises(
        TunelineError, match=r"train.csv is UTF-16 .*iconv -f utf-16 -t utf-8 .*train.csv > train.utf8.csv"
    ):
        _rows(readers.read(path))


def test_a_text_corpus_is_one_document_per_blank_line_separated_block(tmp_path):
    # hard-wrapped lines join into one document; runs of blank lines separate documents
    (tmp_path / "a.txt").write_text("\ufeffFirst document,\nwrapped here.\n\n\n  Second one.\nStill second.\n\nThird")
    assert _rows(readers.read(tmp_path / "a.txt")) == [
        {"text": "First document, wrapped here."},
        {"text": "Second one. Still second."},
        {"text": "Third"},
    ]


@pytest.mark.parametrize("ext", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_files_are_read_as_they_are(tmp_path, ext):
    plain = _write(tmp_path / "d.jsonl", ROWS)
    assert _rows(readers.read(_compress(plain, ext))) == ROWS
    (tmp_path / "c.txt").write_text("\n\n".join(CORPUS))
    assert [r["text"] for r in _rows(readers.read(_compress(tmp_path / "c.txt", ext)))] == CORPUS


def test_a_truncated_compressed_file_is_one_clear_line(tmp_path):
    gz = _compress(_write(tmp_path / "d.jsonl", ROWS * 50), ".gz")
    gz.write_bytes(gz.read_bytes()[:200])
    with pytest.raises(TunelineError, match=r"cannot read .*d.jsonl.gz.*not corrupt"):
        _rows(readers.read(gz))


def test_a_csv_with_a_byte_order_mark_and_a_long_field_loads(tmp_path):
    long = "word " * 40_000  # 200k characters: over the csv module's default field limit
    (tmp_path / "d.csv").write_text(f"\ufefftext,label\n{long},pos\nshort,neg\n")
    rows = _task_rows(_rows(readers.read(tmp_path / "d.csv")), "classify", {}, LABELS)
    assert rows == [{"text": long, "label": "pos"}, {"text": "short", "label": "neg"}]


def test_a_tsv_reads_quotes_as_text_as_glue_writes_them(tmp_path):
    # MNLI's dev_matched.tsv: unpaired quotes in the sentences, no quoting anywhere
    (tmp_path / "d.tsv").write_text('text\tlabel\n"Yes," he said\tpos\n5" of rain, then "more\tneg\n')
    rows = _task_rows(_rows(readers.read(tmp_path / "d.tsv")), "classify", {}, LABELS)
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
        _rows(readers.read(tmp_path / name))


@pytest.mark.parametrize("sep", [";", "\t", "|"], ids=["semicolon", "tab", "pipe"])
def test_a_csv_separated_otherwise_than_by_commas_is_read_by_its_headers_separator(tmp_path, sep):
    """European Excel saves ';'-separated .csv files; a tab-separated file is often named
    .csv. Read as comma-separated, each would be one column named 'text;label'."""
    text = f'text{sep}label\nhello, world{sep}pos\n"quoted{sep} and, so on"{sep}neg\n'
    (tmp_path / "d.csv").write_text(text)
    rows = _task_rows(_rows(readers.read(tmp_path / "d.csv")), "classify", {}, LABELS)
    assert rows == [{"text": "hello, world", "label": "pos"}, {"text": f"quoted{sep} and, so on", "label": "neg"}]


def test_a_row_that_breaks_the_headers_separator_names_it(tmp_path):
    (tmp_path / "d.csv").write_text("text;label\nfine;pos\nsemi; colon;neg\n")
    with pytest.raises(TunelineError, match=r"d.csv line 3 has 3 fields, but its header has 2.*holds a semicolon"):
        _rows(readers.read(tmp_path / "d.csv"))


def test_trailing_empty_fields_are_harmless(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nfine,pos,,\n")  # a spreadsheet's empty columns
    assert _rows(readers.read(tmp_path / "d.csv")) == [{"text": "fine", "label": "pos"}]
    (tmp_path / "e.csv").write_text("text,label,,\nfine,pos,,\n")  # and their empty names
    assert [(r["text"], r["label"]) for r in _rows(readers.read(tmp_path / "e.csv"))] == [("fine", "pos")]


@pytest.mark.parametrize("kind", ["stream", "file"])
def test_an_arrow_file_is_read_in_either_ipc_format(tmp_path, kind):
    """`datasets` writes the stream format (its cache, save_to_disk); pyarrow's
    `ipc.new_file` the random-access one."""
    import pyarrow as pa

    table = pa.Table.from_pylist(ROWS)
    path = tmp_path / "d.arrow"
    with pa.OSFile(str(path), "wb") as f, getattr(pa.ipc, f"new_{kind}")(f, table.schema) as w:
        for b in table.to_batches(max_chunksize=7):  # several record batches
            w.write_batch(b)
    assert _rows(readers.read(path)) == ROWS


def test_a_file_that_is_not_arrow_is_one_clear_line(tmp_path):
    (tmp_path / "d.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(TunelineError, match=r"d.arrow is not a readable Arrow file.*Fix: re-export"):
        _rows(readers.read(tmp_path / "d.arrow"))


def test_a_json_objects_is_read_a_row_at_a_time_whatever_its_layout(tmp_path, monkeypatch):
    """ShareGPT and OpenHermes ship one JSON array of a gigabyte or more: it is decoded as
    it is read, with rows cut anywhere by the read-ahead, and the same rows as json.loads."""
    import json

    rows = [{"text": f'row {i} {"é" * (i % 7)} "quoted"\n', "n": [i, {"deep": i}]} for i in range(200)]
    monkeypatch.setattr(readers, "JSON_READ_AHEAD", 5)  # every row straddles many reads
    for name, text in [("indented", json.dumps(rows, indent=2)), ("one-line", json.dumps(rows, separators=(",", ":")))]:
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        assert _rows(readers.read(path)) == rows, name
    (tmp_path / "empty.json").write_text(" [ ]\n")
    assert _rows(readers.read(tmp_path / "empty.json")) == []
    # JSON Lines in a .json file, as `datasets`' Dataset.to_json writes them (load_dataset reads both)
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _rows(readers.read(tmp_path / "lines.json")) == rows
    # a row is handed on before the rest of the file is read: the file is never held whole
    broken = tmp_path / "broken.json"
    broken.write_text('[{"text": "first"},\n{"text": "second"},\n{"text": oops}]')
    got = readers._json_objects(broken)
    assert next(got) == {"text": "first"} and next(got) == {"text": "second"}
    with pytest.raises(TunelineError, match=r"broken.json is not valid JSON \(Expecting value, line 3\)"):
        next(got)


@pytest.mark.parametrize(
    "text, says",
    [
        ('[{"text": "a"}, "b"]', r"does not hold JSON objects \(one row each\)"),
        ('{"text": "a"}\n["b"]\n', r"does not hold JSON objects \(one row each\)"),
        ('{"text": "a"}\n{"text": oops}\n', r"not valid JSON \(Expecting value, line 2\)"),
        ('[{"text": "a"}\n{"text": "b"}]', r"not valid JSON \(Expecting ',' delimiter, line 2\)"),
        ('[{"text": "a"}', r"not valid JSON \(Expecting '\]', line 1\)"),
        ('[{"text": "a"}]\n[]', r"not valid JSON \(Extra data, line 2\)"),
        ("", r"not valid JSON \(Expecting value, line 1\)"),
    ],
)
def test_a_json_file_that_is_not_a_list_of_rows_is_one_line(tmp_path, text, says):
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(TunelineError, match=says):
        _rows(readers.read(path))
