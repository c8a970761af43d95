"""The near-duplicate audit: a test row that differs from a training row by one word, its
punctuation or its case is found at the default threshold, unrelated rows are not, and
prepare.on_overlap stops, drops or reports them."""

import json
import random

import pytest

from components import prepare
from tuneline import neardup
from tuneline.config import PrepareCfg
from tuneline.data import read_split
from tuneline.errors import TunelineError
from tuneline.params_file import parse_params

THRESHOLD = PrepareCfg().near_dup_threshold  # the default
# Real sentences (the Wikipedia sample's kind), none a near duplicate of another.
SENTENCES = [
    "Anarchism is a political philosophy that advocates self-governed societies based on voluntary institutions.",
    "The river rises in the hills north of the town and flows south into the sea.",
    "He was elected to the city council in 1998 and served two terms as mayor.",
    "The album was recorded over three weeks in a studio in London.",
    "Most species of the genus are found in tropical forests of South America.",
    "The station closed to passengers in 1964 but the line remained open for freight.",
    "She studied medicine at the University of Edinburgh before moving to Canada.",
    "The castle was rebuilt in stone after a fire destroyed the wooden keep.",
    "In the census the village had a population of 412 people living in 160 households.",
    "The novel tells the story of a young sailor who is shipwrecked on an island.",
    "The team won the national championship for the first time in its history.",
    "Copper was mined in the area from the Bronze Age until the nineteenth century.",
]
EDITS = {
    "one word changed": lambda s: s.replace(" the ", " a ", 1) if " the " in s else s.replace(" a ", " the ", 1),
    "one word changed (content word)": lambda s: " ".join(
        w if i != len(s.split()) // 2 else "zebra" for i, w in enumerate(s.split())
    ),
    "one word dropped": lambda s: " ".join(w for i, w in enumerate(s.split()) if i != 2),
    "punctuation changed": lambda s: s.rstrip(".").replace(" ", ", ", 1) + "!",
    "case changed": lambda s: s.upper(),
}


def _index(rows):
    index = neardup.Index(THRESHOLD)
    index.add(enumerate(rows))
    return index


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_injected_near_duplicates_are_found_at_the_default_threshold(edit):
    index = _index(SENTENCES)
    edited = [(100 + i, EDITS[edit](s)) for i, s in enumerate(SENTENCES)]
    found = index.query(edited)
    assert [(p.train, p.other) for p in found] == [(100 + i, i) for i in range(len(SENTENCES))]
    assert all(THRESHOLD <= p.similarity <= 1 for p in found)


def test_unrelated_sentences_are_not_near_duplicates():
    index = _index(SENTENCES[:6])
    assert index.query(list(enumerate(SENTENCES[6:]))) == []
    worst = max(
        neardup.jaccard(neardup.shingles(a), neardup.shingles(b)) for a in SENTENCES for b in SENTENCES if a != b
    )
    assert worst < THRESHOLD / 2  # sharing function words is far from the threshold


def test_similarity_is_exact_not_the_sketch_estimate():
    a, b = SENTENCES[0], EDITS["one word changed (content word)"](SENTENCES[0])
    [pair] = _index([a]).query([(7, b)])
    assert pair.similarity == neardup.jaccard(neardup.shingles(a), neardup.shingles(b))
    assert THRESHOLD < pair.similarity < 1


def test_short_sentences_at_the_threshold_are_still_found_by_the_lsh():
    """Random 6-word sentences with one word changed sit near the threshold (4/7 = 0.57), where
    a sketch is most likely to miss; the banding keeps misses below 1 in 200."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    rows = [" ".join(rng.sample(vocab, 6)) for _ in range(400)]
    index = _index(rows)
    edited = []
    for i, s in enumerate(rows):
        words = s.split()
        words[rng.randrange(6)] = "changed"
        edited.append((1000 + i, " ".join(words)))
    found = index.query(edited)
    assert len(found) >= 398 and all(p.other == p.train - 1000 for p in found)


@pytest.mark.parametrize("threshold, words", [(0.5, 6), (0.7, 10), (0.9, 30)])
def test_pairs_just_above_any_threshold_are_found(threshold, words):
    """One word changed in `words`-word rows scores just above `threshold` ((2n-4)/(2n+2)):
    the banding chosen for each threshold still finds nearly all of them."""
    rng = random.Random(threshold)
    vocab = [f"w{i}" for i in range(5000)]
    rows = [" ".join(rng.sample(vocab, words)) for _ in range(300)]
    index = neardup.Index(threshold)
    index.add(enumerate(rows))
    edited = []
    for i, s in enumerate(rows):
        w = s.split()
        w[rng.randrange(words)] = "changed"
        edited.append((1000 + i, " ".join(w)))
    found = index.query(edited)
    assert threshold <= (2 * words - 4) / (2 * words + 2) < threshold + 0.08
    assert len(found) >= 297 and all(p.other == p.train - 1000 for p in found)


def test_a_conversation_is_compared_by_its_messages_not_its_json():
    from tuneline import tasks

    row = {"messages": json.dumps([{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}])}
    assert neardup.key_text(row, tasks.TASKS["chat"]) == "Hi there\nHello"


# --- through prepare ----------------------------------------------------------------------

LABELS = ["neg", "pos"]
TRAIN = [{"text": s, "label": LABELS[i % 2]} for i, s in enumerate(SENTENCES)]
# The test file: near duplicates of the first three training sentences, and two new ones.
TEST = [
    {"text": EDITS["one word changed (content word)"](SENTENCES[0]), "label": "neg"},
    {"text": EDITS["punctuation changed"](SENTENCES[1]), "label": "pos"},
    {"text": EDITS["one word dropped"](SENTENCES[2]), "label": "neg"},
    {"text": "A completely different sentence about the weather in spring.", "label": "pos"},
    {"text": "Another unrelated line that mentions trains and timetables.", "label": "neg"},
]


def _prepare(tmp_path, monkeypatch, train=TRAIN, **over):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEST))
    files = {"source": str(tmp_path / "train.jsonl"), "test_source": str(tmp_path / "test.jsonl")}
    cfg = {"task": "classify", "labels": LABELS} | files
    return prepare.run(parse_params({"prepare": cfg | {"n_train": 0, "n_val": 2, "n_test": 0} | over}))


def _texts(split):
    return {r["text"] for r in read_split(split)}


def test_near_duplicates_of_test_rows_stop_prepare_by_default(tmp_path, monkeypatch):
    with pytest.raises(TunelineError, match=r"training rows are near duplicates of val/test rows") as e:
        _prepare(tmp_path, monkeypatch)
    assert "\n" not in str(e.value) and "prepare.on_overlap=drop" in str(e.value)
    assert not (tmp_path / "data/prepared").exists()


def test_drop_removes_them_from_train_and_reports_the_pairs(tmp_path, monkeypatch):
    m = _prepare(tmp_path, monkeypatch, on_overlap="drop")
    leaked = set(SENTENCES[:3])
    assert not leaked & _texts("train")
    # the val rows are carved first, so only those of the three left for train were dropped
    assert m["near_duplicates"] == len(leaked - _texts("val")) > 0
    assert m["train_rows"] + m["val_rows"] == len(SENTENCES) - m["near_duplicates"]
    assert m["near_duplicates"] == len(m["near_duplicate_pairs"])
    top = m["near_duplicate_pairs"][0]
    assert top["split"] == "test" and top["train"] in leaked and top["similarity"] >= THRESHOLD
    saved = json.loads((tmp_path / "metrics/prepare.json").read_text())
    assert saved["near_duplicate_pairs"] == m["near_duplicate_pairs"]


def test_report_keeps_them_and_counts_them(tmp_path, monkeypatch):
    m = _prepare(tmp_path, monkeypatch, on_overlap="report")
    assert m["train_rows"] + m["val_rows"] == len(SENTENCES)
    in_train = set(SENTENCES[:3]) & _texts("train")
    assert m["near_duplicates"] == len(in_train) > 0


def test_the_audit_can_be_turned_off(tmp_path, monkeypatch):
    m = _prepare(tmp_path, monkeypatch, near_dup_threshold=None)
    assert "near_duplicates" not in m and m["train_rows"] + m["val_rows"] == len(SENTENCES)


def test_drop_refills_train_to_n_train_from_the_unused_rows(tmp_path, monkeypatch):
    """With n_train set, the rows dropped are replaced by the next in the draw."""
    extra = [
        "Wheat and barley were the main crops grown on the estate.",
        "The bridge carries four lanes of traffic across the harbour.",
        "Her first collection of poems appeared when she was nineteen.",
        "The museum holds a large collection of medieval manuscripts.",
    ]
    train = TRAIN + [{"text": s, "label": "pos"} for s in extra]
    m = _prepare(tmp_path, monkeypatch, train, on_overlap="drop", n_train=len(SENTENCES) - 3)
    assert m["train_rows"] == len(SENTENCES) - 3
    assert not set(SENTENCES[:3]) & _texts("train")


def test_a_train_split_the_audit_left_short_says_so_and_names_the_threshold(tmp_path, monkeypatch):
    """It said "the train split has 0 rows, but 300 are needed (398 usable rows in the source)"
    when the audit had dropped most of the source as near duplicates, and named no threshold."""
    with pytest.raises(
        TunelineError,
        match=rf"the train split has \d+ rows, but {len(SENTENCES) - 2} are needed \({len(SENTENCES)} usable rows in "
        r"the source; [1-3] more were "
        r"dropped from train as near duplicates of val/test rows\)\. Fix: raise prepare.near_dup_threshold "
        r"\(0.5 now\) to drop fewer, or set prepare.n_train=0",
    ):
        _prepare(tmp_path, monkeypatch, on_overlap="drop", n_train=len(SENTENCES) - 2)
    assert not (tmp_path / "data/prepared").exists()
