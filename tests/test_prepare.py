import bz2
import os

import pytest

from components import prepare
from tuneline import sources, tasks
from tuneline.config import parse_params
from tuneline.data import SPLITS, read_split
from tuneline.errors import TunelineError

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
    got = tasks.clean_sentences((t for _, t in sources.article_texts(dump)), 6, 30)
    assert got == [
        "Aardvarks are burrowing mammals that live in Africa today.",
        "They eat ants and termites at night with long sticky tongues.",
        "The name comes from the Afrikaans language of South Africa.",
    ]


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


@pytest.mark.parametrize("source, msg", [("wikidump:/no/such.bz2", "not found"), ("s3://bucket/x", "not supported")])
def test_bad_sources_are_named(source, msg):
    with pytest.raises(TunelineError, match=msg):
        sources.load(source)
