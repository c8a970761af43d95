"""A source's raw rows become the task's rows (tuneline/rows.py): columns mapped or found
under the names other datasets use, labels named, and a bad row named with its fix."""

import pytest

from tuneline import sources
from tuneline.errors import TunelineError
from tuneline.rows import task_rows
from tuneline.tasks import TASKS

LABELS = ["neg", "pos"]


def _plain(batches):
    """The rows' columns (without the file line each CSV/JSONL row carries for messages)."""
    return [{k: v for k, v in r.items() if k != sources.LINE} for batch in batches for r in batch]


def _task_rows(rows, task, columns, labels):
    return _plain(task_rows([rows], TASKS[task], columns, labels, "x"))


def test_columns_are_mapped_integer_labels_named_and_dolly_names_accepted():
    got = _task_rows([{"sentence": "hi", "y": 1}], "classify", {"text": "sentence", "label": "y"}, LABELS)
    assert got == [{"text": "hi", "label": "pos"}]
    dolly = [{"instruction": "Say hi.", "context": "", "response": "Hi!", "category": "open_qa"}]
    assert _task_rows(dolly, "instruct", {}, []) == [{"instruction": "Say hi.", "input": "", "output": "Hi!"}]


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


@pytest.mark.parametrize(
    "row, says",
    [
        ({"text": "hi", "label": 2}, r"row 1 has label 2, outside the declared set \['neg', 'pos'\]"),
        ({"text": "hi", "label": "Pos"}, r"row 1 has label 'Pos'.*did you mean 'pos'\?"),
        ({"text": 3, "label": "pos"}, r"column 'text' must be text, but row 1 holds int '3'"),
        ({"text": None, "label": "pos"}, r"row 1 has no value \(null\) in column 'text'"),
        ({"txt": "hi", "label": "pos"}, r"missing column 'text'.*did you mean 'txt'\?"),
    ],
)
def test_a_bad_row_is_one_line_that_names_the_row_and_the_fix(row, says):
    with pytest.raises(TunelineError, match=says):
        _task_rows([row], "classify", {}, LABELS)
