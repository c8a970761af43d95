import bz2
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from components import prepare
from tuneline import sources, splits, tasks, wikidump
from tuneline.data import SPLITS, read_split
from tuneline.errors import TunelineError
from tuneline.params_file import parse_params

PAGE = (
    """<page><title>{title}</title><ns>{ns}</ns><revision><text xml:space="preserve">{text}</text></revision></page>"""
)


def _dump(path, pages):
    xml = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
        + "".join(PAGE.format(**p) for p in pages)
        + "</mediawiki>"
    )
    path.write_bytes(bz2.compress(xml.encode()))
    return path


def test_wikitext_is_parsed_and_only_clean_sentences_kept(tmp_path):
    text = (
        "'''Aardvarks''' are [[mammal|burrowing mammals]] that live in [[Africa]] today.{{cite web|url=x}} "
        "Short one. They eat ants and termites at night with long sticky tongues.\n"
        "== History ==\nThe name comes from the Afrikaans language of South Africa.&lt;ref&gt;Smith&lt;/ref&gt;"
    )
    dump = _dump(
        tmp_path / "d.xml.bz2",
        [
            {"title": "Aardvark", "ns": 0, "text": text},
            {"title": "Talk:Aardvark", "ns": 1, "text": "This talk page sentence is long enough to keep."},
        ],
    )
    got = tasks.clean_sentences((t for _, t in wikidump.article_texts(dump)), 6, 30)
    assert got == [
        "Aardvarks are burrowing mammals that live in Africa today.",
        "They eat ants and termites at night with long sticky tongues.",
        "The name comes from the Afrikaans language of South Africa.",
    ]


def test_wikitext_is_parsed_in_spawned_worker_processes_even_from_a_threaded_process(tmp_path):
    # Forking copies the locks other threads hold (torch's and pyarrow's threads, which
    # `threading` does not list, are in every stage process): forked workers hung CI twice.
    # Each side runs in a fresh interpreter: a test process may hold other tests' threads.
    dump = _dump(
        tmp_path / "d.xml.bz2",
        [{"title": f"A{i}", "ns": 0, "text": f"Article {i} is about [[x|y]]."} for i in range(40)],
    )
    code = f"""
import json, multiprocessing, sys, threading
from tuneline import wikidump
pools, real = [], multiprocessing.get_context
multiprocessing.get_context = lambda method=None: pools.append(method) or real(method)
stop = threading.Event()
if sys.argv[1] == "threaded":
    import torch  # a thread `threading` does not see
    threading.Thread(target=stop.wait).start()
texts = list(wikidump.article_texts(__import__("pathlib").Path({str(dump)!r}), workers=2))
stop.set()
print(json.dumps([pools, texts]))
"""
    want = [[f"A{i}", f"Article {i} is about y."] for i in range(40)]
    for how in ("threaded", "alone"):
        out = subprocess.run(
            [sys.executable, "-c", code, how],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            check=True,
            timeout=120,
        )
        assert json.loads(out.stdout) == [["spawn"], want], how


def test_ctrl_c_while_workers_parse_leaves_one_line_and_no_worker_behind(tmp_path):
    """Ctrl-C reaches the parse workers too (one process group). They printed tracebacks, and
    after the stage's immediate exit the resource tracker warned of leaked semaphores."""
    heavy = " ".join(f"[[Link {j}|word {j}]] {{{{t|{j}}}}} text." for j in range(300))
    dump = _dump(tmp_path / "d.xml.bz2", [{"title": f"A{i}", "ns": 0, "text": heavy} for i in range(400)])
    # As a stage answers Ctrl-C: its one line, then os._exit (no exit hooks). The signal is
    # sent to the whole group once the workers are parsing.
    code = f"""
import os, signal, threading
from tuneline import wikidump
try:
    for i, _ in enumerate(wikidump.article_texts(__import__("pathlib").Path({str(dump)!r}), workers=2)):
        if i == 0:
            threading.Timer(0.5, os.killpg, (os.getpgid(0), signal.SIGINT)).start()
except KeyboardInterrupt:
    print("interrupted", flush=True)
    os._exit(130)
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
        start_new_session=True,  # its own process group, to interrupt
    )
    assert (out.returncode, out.stdout) == (130, "interrupted\n"), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "leaked" not in out.stderr, out.stderr[-2000:]


def test_real_dump_splits_never_share_a_sentence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = parse_params({"prepare": {"n_train": 300, "n_val": 50, "n_test": 50}})
    metrics = prepare.run(params)
    assert metrics["source_rows"] > 10_000  # the ~13k-sentence sample, cleaned
    splits = {s: read_split(s, tmp_path / "data/prepared") for s in SPLITS}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [300, 50, 50]
    targets = [set(r["target"] for r in rows) for rows in splits.values()]
    assert not (targets[0] & targets[1]) and not (targets[0] & targets[2]) and not (targets[1] & targets[2])
    for r in splits["train"]:
        assert 6 <= len(r["target"].split()) <= 30 and sorted(r["source"].split()) == sorted(r["target"].split())
    # Deterministic: the same seed gives byte-identical data
    first = (tmp_path / "data/prepared/train.parquet").read_bytes()
    prepare.run(params)
    assert (tmp_path / "data/prepared/train.parquet").read_bytes() == first


def test_too_few_sentences_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dump = _dump(tmp_path / "d.xml.bz2", [{"title": "A", "ns": 0, "text": "Only one sentence here is long enough."}])
    params = parse_params({"prepare": {"source": f"wikidump:{dump}", "n_train": 5, "n_val": 1, "n_test": 1}})
    with pytest.raises(TunelineError, match="train split has 0 rows.*1 usable rows.*lower prepare.n_train"):
        prepare.run(params)
    assert not os.path.exists(tmp_path / "data/prepared")  # nothing half-written


def test_a_short_train_split_names_the_setting_that_takes_all_that_remain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (
        "Aardvarks dig long burrows in the dry grasslands of Africa. "
        "The river floods every spring after heavy mountain rains. "
        "Our town library opened a second reading room last winter. "
        "Seven violins played an old tune at the harbour festival."
    )
    dump = _dump(tmp_path / "d.xml.bz2", [{"title": "A", "ns": 0, "text": text}])
    raw = {"prepare": {"source": f"wikidump:{dump}", "n_train": 5, "n_val": 1, "n_test": 1}}
    with pytest.raises(TunelineError, match="train split has 2 rows.*set prepare.n_train=0 to train on the 2"):
        prepare.run(parse_params(raw))
    raw["prepare"]["n_train"] = 0  # the fix it names works
    prepare.run(parse_params(raw))
    assert pq.read_metadata(tmp_path / "data/prepared/train.parquet").num_rows == 2


@pytest.mark.parametrize("source, msg", [("wikidump:/no/such.bz2", "not found"), ("s3://bucket/x", "not supported")])
def test_bad_sources_are_named(source, msg):
    with pytest.raises(TunelineError, match=msg):
        sources.load(source)


def _outputs(root):
    return {s: (root / f"data/prepared/{s}.parquet").read_bytes() for s in SPLITS}


def test_splits_do_not_depend_on_how_the_input_is_cut(tmp_path, monkeypatch):
    """One file read in one batch, the same file in batches of 7 rows, and the same rows as
    five shard files give byte-identical splits: the draw is a hash of each example."""
    import json

    rows = [{"text": f"tweet {i} " + "word " * (i % 5), "label": ("neg", "pos")[i % 2]} for i in range(300)]
    rows += rows[:40]  # duplicates, some in other batches and other shards than their first copy
    data = tmp_path / "src"
    data.mkdir()
    (data / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for k in range(5):
        (data / f"shard{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[k * 68 : (k + 1) * 68]))
    cfg = {"task": "classify", "labels": ["neg", "pos"], "n_train": 200, "n_val": 20, "n_test": 30}
    monkeypatch.setattr(splits, "ROW_GROUP_CHARS", 1000)  # several row groups, cut by text size
    got = []
    for source, batch in ((data / "all.jsonl", 100_000), (data / "all.jsonl", 7), (data / "shard*.jsonl", 100_000)):
        out = tmp_path / f"run{len(got)}"
        out.mkdir()
        monkeypatch.chdir(out)
        monkeypatch.setattr(sources, "BATCH_ROWS", batch)
        m = prepare.run(parse_params({"prepare": cfg | {"source": str(source)}}))
        assert m["duplicates_removed"] == 40
        got.append(_outputs(out))
    assert got[0] == got[1] == got[2]
    assert pq.ParquetFile(tmp_path / "run0/data/prepared/train.parquet").num_row_groups > 3
    texts = {s: {r["text"] for r in read_split(s)} for s in SPLITS}
    assert [len(texts[s]) for s in ("train", "val", "test")] == [200, 20, 30]  # unique rows, one split each
    assert not (texts["train"] & texts["val"] or texts["train"] & texts["test"] or texts["val"] & texts["test"])


def test_bad_rows_skip_prepares_the_rest_and_records_what_it_left_out(tmp_path, monkeypatch):
    import json

    from tuneline import card
    from tuneline.io import read_json

    monkeypatch.chdir(tmp_path)
    lines = [json.dumps({"text": f"tweet number {i}", "label": ("neg", "pos")[i % 2]}) for i in range(60)]
    lines[7] = json.dumps({"text": "so so", "label": "meh"})
    lines[30] = json.dumps({"label": "pos"})
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    src = str(tmp_path / "d.jsonl")
    cfg = {"task": "classify", "labels": ["neg", "pos"], "source": src, "n_train": 0, "n_val": 5, "n_test": 5}
    with pytest.raises(TunelineError, match="d.jsonl line 8 has label 'meh'"):
        prepare.run(parse_params({"prepare": cfg}))
    params = parse_params({"prepare": cfg | {"bad_rows": "skip"}})
    m = prepare.run(params)
    assert m["train_rows"] + m["val_rows"] + m["test_rows"] == 58 and m["bad_rows"] == 2
    saved = read_json(tmp_path / "metrics/prepare.json")
    assert saved["bad_rows_source"]["rows"] == 2 and saved["bad_rows_source"]["of"] == 60
    assert "d.jsonl line 31 has no column 'text'" in saved["bad_rows_source"]["examples"][1]
    text = "\n".join(card._audit(saved, params))  # the model card says so
    assert "bad rows left out of source (prepare.bad_rows=skip): 2 of 60" in text and "line 8 has label 'meh'" in text


def test_another_seed_draws_other_splits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = {"prepare": {"source": "tests/data/none.jsonl"}}  # replaced below
    rows = "".join(f'{{"text": "row {i}", "label": "pos"}}\n' for i in range(100))
    (tmp_path / "d.jsonl").write_text(rows)
    cfg = {"task": "classify", "labels": ["neg", "pos"], "source": str(tmp_path / "d.jsonl"), "n_train": 0}
    cfg |= {"n_val": 10, "n_test": 10}
    prepare.run(parse_params({"prepare": cfg, "seed": 1}))
    first = {r["text"] for r in read_split("test")}
    prepare.run(parse_params({"prepare": cfg, "seed": 2}))
    assert {r["text"] for r in read_split("test")} != first


def test_a_parsed_dump_is_kept_whole_once_and_read_back_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELINE_CACHE", str(tmp_path / "cache"))
    dump = _dump(
        tmp_path / "d.xml.bz2",
        [
            {"title": f"A{i}", "ns": 0, "text": f"Article {i} is about [[x|y]].\n\nIts second paragraph."}
            for i in range(30)
        ],
    )
    kept = wikidump.cache_path("d1")
    # A read stopped early (a crash, an error in a later row) leaves no cache, not a partial one.
    first = wikidump.paragraphs(dump, sha256="d1")
    next(first)
    first.close()
    assert not kept.exists() and list(kept.parent.iterdir()) == []

    orphan = kept.with_name(f".{kept.name}.tmp999999999")  # what a killed parse leaves: its pid is gone
    orphan.write_text("partial")
    seen = []
    parsed = list(wikidump.paragraphs(dump, on_read=seen.append, sha256="d1"))
    assert not orphan.exists()
    assert parsed[:2] == [("A0", "Article 0 is about y."), ("A0", "Its second paragraph.")] and len(parsed) == 60
    assert kept.is_file() and seen[-1] == dump.stat().st_size

    def no_parse(*a, **k):
        raise AssertionError("parsed again")

    monkeypatch.setattr(wikidump, "article_texts", no_parse)
    seen.clear()
    assert list(wikidump.paragraphs(dump, on_read=seen.append, sha256="d1")) == parsed
    assert seen[-1] == dump.stat().st_size
    with pytest.raises(AssertionError, match="parsed again"):  # another dump is parsed, not read from this one
        list(wikidump.paragraphs(dump, sha256="d2"))
