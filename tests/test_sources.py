"""Every source kind loads, and every kind of bad data stops prepare with one clear line."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tuneline
from components import prepare
from tuneline import readers, sources
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
    elif ext == ".arrow":
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, pa.Table.from_pylist(rows).schema) as w:
            w.write_table(pa.Table.from_pylist(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _rows(batches):
    """The rows' columns (without the file line each CSV/JSONL row carries for messages)."""
    return [{k: v for k, v in r.items() if k != readers.LINE} for batch in batches for r in batch]


def _task_rows(rows, task, columns, labels):
    return _rows(task_rows([rows], TASKS[task], columns, labels, "x"))


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".json", ".jsonl", ".parquet", ".arrow"])
def test_each_local_format_loads_the_same_rows(tmp_path, ext):
    batches, lineage, prose = sources.load(str(_write(tmp_path / f"d{ext}", ROWS)))
    assert _rows(task_rows(batches, TASKS["classify"], {}, LABELS, "x")) == ROWS and not prose
    assert len(next(iter(lineage["sha256"].values()))) == 64  # file hash recorded for lineage


def test_a_glob_reads_every_matching_file(tmp_path):
    _write(tmp_path / "a.jsonl", ROWS[:10])
    _write(tmp_path / "b.jsonl", ROWS[10:])
    batches, lineage, _ = sources.load(str(tmp_path / "*.jsonl"))
    assert _rows(batches) == ROWS and len(lineage["sha256"]) == 2


def test_a_text_file_is_prose(tmp_path):
    (tmp_path / "a.txt").write_text("One document.\n\nAnother.")
    assert sources.load(str(tmp_path / "a.txt"))[2]  # `Task.prose` makes the examples


def test_a_dataset_saved_by_datasets_save_to_disk_is_a_source(tmp_path):
    """What a Hugging Face user has at hand after `ds.save_to_disk(...)`: its Arrow files are
    read in order, and ClassLabel ids as their names (whatever order prepare.labels lists)."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=LABELS)})
    ids = [{"text": r["text"], "label": LABELS.index(r["label"])} for r in ROWS]
    datasets.Dataset.from_list(ids, features=features).save_to_disk(tmp_path / "ds", num_shards=3)
    batches, lineage, prose = sources.load(str(tmp_path / "ds"))
    assert _task_rows(_rows(batches), "classify", {}, LABELS[::-1]) == ROWS and not prose
    assert len(lineage["sha256"]) == 3  # each shard's hash: re-saving the dataset re-runs prepare
    # A DatasetDict holds one folder per split: the user names one.
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:4])}
    ).save_to_disk(tmp_path / "dd")
    with pytest.raises(
        TunelineError,
        match=r"is a DatasetDict saved by save_to_disk \(splits: test, train\).*dd/train'.*dd/test' as prepare.test_source",
    ):
        sources.load(str(tmp_path / "dd"))
    assert _rows(sources.load(str(tmp_path / "dd" / "test"))[0]) == ROWS[:4]
    # A folder copied without one of its shards is named, not read in part.
    next((tmp_path / "ds").glob("data-00001-*.arrow")).unlink()
    with pytest.raises(TunelineError, match=r"ds' lacks data-00001-of-00003.arrow \(listed in its state.json\)"):
        sources.load(str(tmp_path / "ds"))


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
