"""A source's raw rows become the task's rows (tuneline/rows.py): columns mapped or found
under the names other datasets use, labels named, and a bad row named with its fix."""

import pytest

from tuneline import readers, sources
from tuneline.errors import TunelineError
from tuneline.rows import task_rows
from tuneline.tasks import TASKS

LABELS = ["neg", "pos"]


def _plain(batches):
    """The rows' columns (without the file line each CSV/JSONL row carries for messages)."""
    return [{k: v for k, v in r.items() if k != readers.LINE} for batch in batches for r in batch]


def _task_rows(rows, task, columns, labels):
    return _plain(task_rows([rows], TASKS[task], columns, labels, "x"))


def test_columns_are_mapped_integer_labels_named_and_dolly_names_accepted():
    got = _task_rows([{"sentence": "hi", "y": 1}], "classify", {"text": "sentence", "label": "y"}, LABELS)
    assert got == [{"text": "hi", "label": "pos"}]
    dolly = [{"instruction": "Say hi.", "context": "", "response": "Hi!", "category": "open_qa"}]
    assert _task_rows(dolly, "instruct", {}, []) == [{"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    # A file that joins Alpaca and Dolly records: each row is read under its own names
    alpaca = {"instruction": "Say bye.", "input": "", "output": "Bye!"}
    assert _task_rows(dolly + [alpaca], "instruct", {}, [])[1] == alpaca
    assert _task_rows([alpaca] + dolly, "instruct", {}, [])[1] == dict(alpaca, instruction="Say hi.", output="Hi!")


def test_labels_that_are_numbers_are_read_as_names_from_json_and_csv_alike():
    """Star ratings: JSON's 1 was read as the id labels[1], '2', where a CSV's '1' is '1'."""
    stars = ["1", "2", "3", "4", "5"]
    rows = [{"text": "meh", "label": 1}, {"text": "ok", "label": "3"}, {"text": "top", "label": 5}]
    assert [r["label"] for r in _task_rows(rows, "classify", {}, stars)] == ["1", "3", "5"]
    with pytest.raises(TunelineError, match=r"row 1 has label 0, outside the declared set"):  # never an id
        _task_rows([{"text": "zero", "label": 0}], "classify", {}, stars)


def test_glue_and_multinli_files_are_read_as_they_come(tmp_path):
    """The mnli recipe reads "local GLUE-format files": GLUE's dev_matched.tsv (and
    MultiNLI's own jsonl) name the pair sentence1/sentence2 and the label gold_label."""
    tsv = tmp_path / "dev_matched.tsv"
    head = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    tsv.write_text(head + '0\t1\t1n\tgov\tHe said "yes.\tHe agreed.\tentailment\tentailment\n')
    batches, _, _ = sources.load(str(tsv))
    got = _plain(task_rows(batches, TASKS["entail"], {}, ["entailment", "neutral", "contradiction"], "x"))
    assert got == [{"premise": 'He said "yes.', "hypothesis": "He agreed.", "label": "entailment"}]


def test_a_column_name_with_invisible_characters_or_spaces_is_the_column_meant(capsys):
    """Spreadsheets leave 'text ' or 'text\u200b' headers: read as 'text', and said."""
    got = _task_rows([{"text\u200b": "hi", " label ": "pos"}], "classify", {}, LABELS)
    assert got == [{"text": "hi", "label": "pos"}]
    out = capsys.readouterr().out  # the name as repr writes it, so the invisible character shows
    assert r"reading column 'text\u200b' as 'text'" in out and "reading column ' label ' as 'label'" in out


def test_a_mapping_that_one_source_needs_leaves_a_source_with_the_tasks_own_column_alone(capsys):
    """One prepare.columns maps every source: the emotion tweets (`text`) as a descrambler's
    test_source need target=text, and the Wikipedia source already says `target`."""
    mapped = {"target": "text"}

    def targets(rows):
        return [r["target"] for r in _task_rows(rows, "descramble", mapped, [])]

    assert targets([{"text": "The cat sat."}]) == ["The cat sat."]
    assert targets([{"target": "A dog ran."}]) == ["A dog ran."]
    assert "x: no column 'text' (prepare.columns.target); reading its 'target'" in capsys.readouterr().out
    assert targets([{"target": "kept", "text": "mapped"}]) == ["mapped"]  # where both are, the mapping decides


@pytest.mark.parametrize(
    "row, says",
    [
        ({"text": "hi", "label": 2}, r"row 1 has label 2, outside the declared set \['neg', 'pos'\]"),
        ({"text": "hi", "label": "Pos"}, r"row 1 has label 'Pos'.*did you mean 'pos'\?"),
        ({"text": 3, "label": "pos"}, r"column 'text' must be text, but row 1 holds int '3'"),
        ({"text": None, "label": "pos"}, r"row 1 has no value \(null\) in column 'text'"),
        ({"text": " \n", "label": "pos"}, r"row 1 has an empty 'text'. Fix: give that row a value"),
        ({"txt": "hi", "label": "pos"}, r"missing column 'text'.*did you mean 'txt'\?"),
        # no name like 'label', but the one column nothing else reads: the command to map it
        (
            {"text": "hi", "emotion": "pos"},
            r"missing column 'label'.*did you mean 'emotion'\? map it with --set prepare.columns.label=emotion",
        ),
    ],
)
def test_a_bad_row_is_one_line_that_names_the_row_and_the_fix(row, says):
    with pytest.raises(TunelineError, match=says):
        _task_rows([row], "classify", {}, LABELS)


def _mixed(n_good: int, bad: list[dict]) -> list[dict]:
    rows = [{"text": f"tweet {i}", "label": LABELS[i % 2]} for i in range(n_good)]
    for k, r in enumerate(bad):
        rows.insert(3 * k + 1, r)
    return rows


BAD = [{"text": "x", "label": "meh"}, {"text": None, "label": "pos"}, {"text": 7, "label": "neg"}]


def test_skip_leaves_the_bad_rows_out_and_counts_them(capsys):
    rows = _mixed(20, BAD)
    with pytest.raises(TunelineError, match="row 2 has label 'meh'"):  # the default stops at the first
        list(task_rows([rows], TASKS["classify"], {}, LABELS, "x"))
    skipped: dict = {}
    kept = _plain(task_rows([rows[:12], rows[12:]], TASKS["classify"], {}, LABELS, "x", "skip", skipped))
    assert kept == [r for r in rows if r not in BAD] and len(kept) == 20  # the good rows, in order
    assert skipped["rows"] == 3 and skipped["of"] == 23
    assert skipped["examples"] == [
        "row 2 has label 'meh', outside the declared set ['neg', 'pos']",
        "row 5 has no value (null) in column 'text'",
        "column 'text' must be text, but row 8 holds int '7'",
    ]
    assert "x: left out 3 bad rows of 23 (prepare.bad_rows=skip), e.g. row 2 has label 'meh'" in capsys.readouterr().out


def test_skip_still_stops_when_most_rows_are_bad_or_a_column_is_missing():
    # Every label outside the set is a forgotten prepare.labels, not a few bad rows.
    rows = [{"text": f"t{i}", "label": "happy" if i % 4 else "pos"} for i in range(40)]
    with pytest.raises(TunelineError, match=r"30 of the first 40 rows are bad.*points to a setting"):
        list(task_rows([rows], TASKS["classify"], {}, LABELS, "x", "skip"))
    # Data out of scope as a whole: the rows' own fix comes first, without its "or skip the row"
    tools = [{"role": "user", "content": "x"}, {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "y"}]
    with pytest.raises(TunelineError) as e:
        list(task_rows([[{"messages": tools}] * 4], TASKS["chat"], {}, [], "x", "skip"))
    assert e.value.fix.startswith("remove tool turns and the rows that need them (the first bad row's fix); that many")
    with pytest.raises(TunelineError) as e:
        list(task_rows([rows], TASKS["classify"], {}, LABELS, "x", "skip"))
    assert e.value.fix.startswith("add it to prepare.labels (the first bad row's fix); that many usually points")

    # ... and on a large source it stops once the first 1000 rows show it, before reading the rest
    def endless():
        while True:
            yield [{"text": "t", "label": "happy"}] * 500

    with pytest.raises(TunelineError, match="1000 of the first 1000 rows are bad"):
        list(task_rows(endless(), TASKS["classify"], {}, LABELS, "x", "skip"))
    with pytest.raises(TunelineError, match="missing column 'text'"):
        list(task_rows([[{"txt": "hi", "label": "pos"}]], TASKS["classify"], {}, LABELS, "x", "skip"))


def test_blank_rows_of_a_pretraining_corpus_are_left_out_and_counted(capsys):
    """wikitext and other line-per-row corpora keep blank lines between paragraphs: they hold
    nothing to learn, so pretraining leaves them out (an empty answer elsewhere is a bad row)."""
    rows = [{"text": "A paragraph."}, {"text": ""}, {"text": " \n"}, {"text": "Another one."}]
    assert _task_rows(rows, "pretrain", {}, []) == [{"text": "A paragraph."}, {"text": "Another one."}]
    assert "x: left out 2 blank rows of 4 (nothing to learn)" in capsys.readouterr().out
    with pytest.raises(TunelineError, match="row 2 has an empty 'output'"):
        _task_rows([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""}], "instruct", {}, [])
