"""A served request read as its task reads it (tuneline/request.py): the row it stands for,
and the prompt as a template over the fields a request fills (the export's example)."""

import pytest

from tuneline import request, tasks

EMOTIONS = ["sadness", "joy", "love", "anger", "fear", "surprise"]


def test_prompt_format_has_one_slot_for_each_field_given():
    for name, task in tasks.TASKS.items():
        if task.chat:
            continue  # its model's chat template renders it
        tmpl = request.prompt_format(task, EMOTIONS, task.serve_fields)
        assert [tmpl.count("{" + f + "}") for f in task.serve_fields] == [1] * len(task.serve_fields), name
    assert request.prompt_format(tasks.TASKS["descramble"], [], ("source",)) == "Unscramble: {source}\nSentence:"
    instruct = tasks.TASKS["instruct"]
    assert "{input}" not in request.prompt_format(instruct, [], ("instruction",))


def test_a_request_fills_its_tasks_fields_as_text_or_as_named_json():
    classify, instruct = tasks.TASKS["classify"], tasks.TASKS["instruct"]
    assert request.row(classify, "i feel great")["text"] == "i feel great"
    assert request.row(classify, '{"text": "i feel great"}')["text"] == "i feel great"  # not the braces and key
    for braced in ('{"mood": "x"}', "{not json", '{"text": "a", "mood": "b"}'):  # no field of it: still text
        assert request.row(classify, braced)["text"] == braced
    row = request.row(instruct, '{"instruction": "Summarise.", "context": "The cat sat."}')  # Dolly's name
    assert (row["instruction"], row["input"]) == ("Summarise.", "The cat sat.")
    with pytest.raises(ValueError, match="names 'mood', which the instruct task does not read"):
        request.row(instruct, '{"instruction": "Summarise.", "mood": "x"}')
    with pytest.raises(ValueError, match="has no 'instruction'"):
        request.row(instruct, "{}")
    assert request.prompt(tasks.TASKS["pretrain"], "The history of", []) == "The history of"
