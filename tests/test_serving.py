"""The registered model (tuneline/serving.py): logged as MLflow code with safetensors, it
answers every way a user reaches it exactly as evaluate decodes."""

import json

import mlflow
import pandas as pd
import pytest
import torch

from tuneline import evaluation, predict, recipes, serving, tasks
from tuneline.constrain import WordConstraint
from tuneline.errors import TunelineError
from tuneline.evaluation import load_any
from tuneline.generation import generate
from tuneline.hardware import autocast

INPUTS = ["sat cat the mat on the", "went I home", "the was founded university in 1908."]


def _as_evaluate(model, tok, params, texts, constrain: bool) -> list[str]:
    """What evaluate's decoding gives for these requests (tuneline/evaluation.py's call)."""
    task = tasks.TASKS[params.prepare.task]
    prompts = [task.prompt({"source": t, "target": ""}, []) for t in texts]
    words = WordConstraint(tok, texts) if constrain else None
    with autocast(params.evaluate.precision):
        return generate(model, tok, prompts, params.evaluate.max_new_tokens, 32, 1, task.stop, constraint=words)


def test_the_served_descrambler_keeps_the_words_and_answers_as_evaluate_decodes(logged, tiny_gpt2, gpt2_tok):
    uri, params, root = logged
    served = mlflow.pyfunc.load_model(uri)
    kept = served.predict(INPUTS)
    assert all(tasks.same_words(a, t) for a, t in zip(kept, INPUTS)), kept  # even untrained: the input's words
    assert kept == _as_evaluate(tiny_gpt2, gpt2_tok, params, INPUTS, constrain=True)
    assert served.predict(pd.DataFrame({"text": INPUTS})) == kept  # a served JSON list arrives as a frame
    free = served.predict(INPUTS, params={"constrain": "none"})
    assert free == _as_evaluate(tiny_gpt2, gpt2_tok, params, INPUTS, constrain=False)
    assert not all(tasks.same_words(a, t) for a, t in zip(free, INPUTS))


# What a user sends to each shipped recipe's model, and the row evaluate scores for it. A
# request fills the task's `serve_field`; mnli's is the pair in the `mnli hypothesis: …
# premise: … target:` line (README), read by tasks.mnli_pair. pretrain continues whatever
# it is sent; chat is tested in test_chat.py.
REQUESTS = {
    "descramble": ({"source": "sat cat the", "target": "the cat sat"}, "sat cat the"),
    "emotion": ({"text": "i feel great", "label": "joy"}, "i feel great"),
    "alpaca": ({"instruction": "Name a colour.", "input": "", "output": "Red."}, "Name a colour."),
    "mnli": (
        {"premise": "A man walks.", "hypothesis": "A man is outside.", "label": "entailment"},
        "mnli hypothesis: A man is outside. premise: A man walks. target:",
    ),
}


def test_every_recipe_that_answers_a_request_is_checked_below():
    assert set(recipes.names()) == set(REQUESTS) | {"pretrain", "chat"}


@pytest.mark.parametrize("recipe", sorted(REQUESTS))
def test_a_served_request_is_prompted_as_evaluate_prompts_its_row(recipe, tiny_gpt2, gpt2_tok):
    params = recipes.build(recipe, ["model.name=tiny-gpt2"], False, None)
    task, (row, request) = tasks.TASKS[params.prepare.task], REQUESTS[recipe]
    scored = tasks.render(task, row, list(params.prepare.labels))[0]  # evaluate's prompt for the row
    answerer = serving.Answerer()
    answerer.model, answerer.tok, answerer.config = tiny_gpt2, gpt2_tok, serving.settings(params)
    assert answerer.prompts([request]) == [scored]
    # the same request as JSON that names the task's fields (`tuneline predict '{"text": ...}'`)
    fields = {f: row[f] for f in task.serve_fields if row.get(f)}
    assert answerer.prompts([json.dumps(fields)]) == [scored]
    if len(task.serve_fields) == 1:  # a text that is JSON naming no field of the task stays text
        braced = ['{"mood": "x"}', "{not json"]
        labels = list(params.prepare.labels)
        assert answerer.prompts(braced) == [
            tasks.render(task, row | {task.serve_fields[0]: b}, labels)[0] for b in braced
        ]


def test_a_served_entailment_pair_is_read_in_any_order_and_anything_else_is_refused(tiny_gpt2, gpt2_tok):
    """An mnli request is a premise and a hypothesis: `mnli` and `target:` may be left out and
    the premise may come first; a bare sentence is refused in one line with the form, not
    answered after a prompt the model never saw."""
    params = recipes.build("mnli", ["model.name=tiny-gpt2"], False, None)
    answerer = serving.Answerer()
    answerer.model, answerer.tok, answerer.config = tiny_gpt2, gpt2_tok, serving.settings(params)
    scored = "mnli hypothesis: A man is outside. premise: A man walks. target:"
    same = [
        "hypothesis: A man is outside. premise: A man walks.",
        "premise: A man walks.\nhypothesis: A man is outside.",
    ]
    assert answerer.prompts(same) == [scored] * 2
    with pytest.raises(
        TunelineError, match=r"input 2 of 2 'A man walks.' is not a hypothesis and a premise.*Fix: write it as 'mnli"
    ):
        answerer.prompts([scored, "A man walks."])


def test_the_registered_model_is_code_and_safetensors_and_loads_back_for_the_gate(logged, tiny_gpt2):
    uri, _, root = logged
    files = [p for p in (root / "art").rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files) and any(p.name == "served_model.py" for p in files)
    heads = {p.name: p.read_bytes()[:4] for p in files}
    assert [n for n, h in heads.items() if h[:1] == b"\x80" or h == b"PK\x03\x04"] == []  # no pickle, no torch.save
    model, tok = load_any(uri)  # what the gate re-evaluates an old champion with
    assert tok.pad_token is not None
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_gpt2.state_dict().values()))


def test_a_bad_request_is_refused_in_one_line(logged):
    served = mlflow.pyfunc.load_model(logged[0])
    with pytest.raises(
        TunelineError, match=r"the input is \d+ tokens.*positions for 1024.*shorten it to under \d+ tokens"
    ):
        served.predict(["word " * 1100])
    # Among several, the one named; `tuneline predict` checks them all before answering any.
    with pytest.raises(TunelineError, match=r"input 2 of 3 is \d+ tokens"):
        predict.check(served, [INPUTS[0], "word " * 1100, INPUTS[0]])
    predict.check(served, INPUTS)  # nothing to refuse
    # Kept to its words, an answer longer than the budget (24 tokens here) would leave words out
    long = " ".join(f"w{i}" for i in range(30))
    with pytest.raises(TunelineError, match=r"the input is \d+ tokens of words.*at most 24 tokens.*leave words out"):
        served.predict([long])
    with pytest.raises(TunelineError, match=r"input 2 of 2 is \d+ tokens of words"):
        predict.check(served, [INPUTS[0], long])
    assert len(served.predict([long], params={"constrain": "none"})) == 1  # free decoding promises no words
    predict.check(served, [long], "none")
    with pytest.raises(TunelineError, match="constrain 'maybe' does not apply.*ask for 'none' or 'words'"):
        served.predict(INPUTS[:1], params={"constrain": "maybe"})
    with pytest.raises(TunelineError, match=r"num_beams 0 is not a number of beams. Fix: ask for 1 \(greedy\) or more"):
        served.predict(INPUTS[:1], params={"num_beams": 0})  # `--beams` refuses it; a served request did not
    for empty in ("", "  ", None):  # `tuneline predict` refuses them; served, they were answered
        with pytest.raises(TunelineError, match="input 2 of 2 is empty, so there is nothing to answer. Fix: give"):
            served.predict([INPUTS[0], empty])
        # named, as a served frame's column (`dataframe_records`): it was answered with ''
        # (descramble's `source` may be missing from data, where prepare makes it; not here)
        with pytest.raises(TunelineError, match="input 2 of 2 .* has no 'source'"):
            served.predict(pd.DataFrame({"source": [INPUTS[0], empty]}))


def test_a_model_without_words_decodes_freely_and_refuses_the_word_constraint():
    params = recipes.build("emotion", ["model.name=tiny-gpt2"], True, None)
    config = serving.settings(params)
    assert config["constrain"] == "none" and config["labels"] == list(params.prepare.labels)
    answerer = serving.Answerer()
    answerer.config = config
    with pytest.raises(TunelineError, match="does not apply to a model of the classify task.*ask for 'none'"):
        answerer.predict(None, ["i feel great"], {"constrain": "words"})
    # beams with labels: served, they were ignored (`tuneline predict --labels --beams 3` refuses)
    with pytest.raises(TunelineError, match="num_beams 3 does not apply to constrain 'labels'.*Fix: leave out"):
        answerer.predict(None, ["i feel great"], {"constrain": "labels", "num_beams": 3})


def test_a_classifier_asked_for_labels_answers_the_label_evaluate_scores_highest(tiny_gpt2, gpt2_tok, logged):
    """{"constrain": "labels"} (`tuneline predict --labels`): always a declared label, the one
    evaluate's constrained label scoring picks (scored_accuracy), even from an untrained
    model whose free answers are not labels."""
    params = recipes.build("emotion", ["model.name=tiny-gpt2"], False, None)
    labels = list(params.prepare.labels)
    answerer = serving.Answerer()
    answerer.model, answerer.tok, answerer.config = tiny_gpt2, gpt2_tok, serving.settings(params)
    texts = ["i feel great", "i am so scared of the dark", "this makes me furious", "what a lovely surprise", "joy"]
    texts += ["sad sad sad", "anger and fear", "surprise!", "I love it", "meh"]
    with autocast(params.evaluate.precision):
        scored = evaluation.score_labels(tiny_gpt2, gpt2_tok, [{"text": t, "label": labels[0]} for t in texts], params)
    assert answerer.predict(None, texts, {"constrain": "labels"}) == scored
    assert set(scored) <= set(labels) and len(set(scored)) > 1  # the label depends on the input
    assert not set(answerer.predict(None, texts)) <= set(labels)  # decoded freely, as evaluate's `accuracy`
    with pytest.raises(
        TunelineError, match="constrain 'labels' does not apply to a model of the descramble task.*'none' or 'words'"
    ):
        mlflow.pyfunc.load_model(logged[0]).predict(INPUTS[:1], params={"constrain": "labels"})


def test_over_http_an_instruction_arrives_with_its_input_in_every_form_mlflow_takes(scoring_app):
    """An Alpaca request's `input` (its context) is part of the trained prompt. MLflow cut a
    frame to its first column, so an instruction sent with its input was answered without
    it, silently; now every form MLflow takes reaches the prompt whole, or is refused."""
    model, http = scoring_app("alpaca")
    answerer = model.unwrap_python_model()
    seen = []
    answerer.prompts = lambda texts, own=answerer.prompts: seen.append(own(texts)) or seen[-1]
    whole = "### Instruction:\nSummarise.\n\n### Context:\nThe cat sat.\n\n### Response:\n"
    bodies = [
        {"dataframe_records": [{"instruction": "Summarise.", "input": "The cat sat."}]},
        {"dataframe_split": {"columns": ["instruction", "context"], "data": [["Summarise.", "The cat sat."]]}},
        {"inputs": {"instruction": ["Summarise."], "input": ["The cat sat."]}},
        {"inputs": {"instruction": "Summarise.", "input": "The cat sat."}},
        {"instances": [{"instruction": "Summarise.", "input": "The cat sat."}]},
        {"inputs": [{"instruction": "Summarise.", "input": "The cat sat."}]},  # its values arrive as arrays
        {"inputs": [json.dumps({"instruction": "Summarise.", "input": "The cat sat."})]},  # `tuneline predict`'s form
    ]
    for body in bodies:
        said = http.post("/invocations", json=body)
        assert said.status_code == 200 and seen[-1] == [whole], (body, said.text)
    for bare in (["Summarise."], "Summarise."):  # a bare instruction, as before; one string: one input
        said = http.post("/invocations", json={"inputs": bare})
        assert said.status_code == 200 and seen[-1] == ["### Instruction:\nSummarise.\n\n### Response:\n"]
    # A field it would not read, or none to answer, is refused with the line, not "unexpected".
    refused = {
        "names 'id', which the instruct task does not read": {"dataframe_records": [{"instruction": "x", "id": 3}]},
        "has no 'instruction'": {"dataframe_records": [{"input": "The cat sat."}]},
        "fields have different lengths": {"inputs": {"instruction": ["a", "b"], "input": ["c"]}},
    }
    for line, body in refused.items():
        said = http.post("/invocations", json=body)
        assert said.status_code == 400 and line in said.json()["message"], said.text
        assert 'name the fields "instruction", "input"' in said.json()["message"] or "lengths" in line


def test_over_http_an_entailment_pair_is_read_from_named_fields_and_a_bare_sentence_refused(scoring_app):
    model, http = scoring_app("mnli")
    pair = {"premise": "A man walks.", "hypothesis": "A man is outside."}
    expected = model.predict(["mnli hypothesis: A man is outside. premise: A man walks. target:"])
    for body in ({"dataframe_records": [pair]}, {"inputs": [json.dumps(pair)]}):
        said = http.post("/invocations", json=body)
        assert said.status_code == 200 and said.json()["predictions"] == expected, said.text
    said = http.post("/invocations", json={"inputs": ["A man walks."]})
    assert said.status_code == 400 and "is not a hypothesis and a premise" in said.json()["message"], said.text


def test_a_tuned_models_task_and_labels_are_read_without_loading_it(tmp_path, logged):
    """What `tuneline evaluate` checks a --recipe against, and a run its registered name."""
    from tuneline.modeling import TRAINED_PARAMS

    assert serving.tuned_for(logged[0]) == ("descramble", [])  # a registered version's settings
    folder = tmp_path / "exported"  # a merged, registered or exported folder carries its run's params
    folder.mkdir()
    params = recipes.build("emotion", ["model.name=tiny-gpt2"], False, None)
    (folder / TRAINED_PARAMS).write_text(json.dumps(params.model_dump()))
    assert serving.tuned_for(str(folder)) == ("classify", ["sadness", "joy", "love", "anger", "fear", "surprise"])
    assert serving.tuned_for("tiny-gpt2") is None and serving.tuned_for(str(tmp_path)) is None  # base: any task


def test_a_run_for_another_task_is_refused_before_it_would_face_the_champion(logged):
    """An emotion run registered as 'descrambler' (the schema's default name) had its gate
    score the descrambler on tweets (accuracy 0), promote the classifier, and `tuneline
    predict 'sat cat the'` answer 'joy'."""
    name = "held-by-a-descrambler"
    version = mlflow.register_model(logged[0], name).version
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version)
    emotion = recipes.build("emotion", [f"register.model_name={name}"], False, None)
    with pytest.raises(
        TunelineError,
        match=rf"register.model_name '{name}' holds a model for the descramble task \(champion v{version}\), and "
        rf"this run trains one for the classify task. Fix: give it a name of its own, e.g. --set "
        rf"register.model_name={name}-classify",
    ):
        serving.check_champion_task(emotion)
    serving.check_champion_task(recipes.build(None, [f"register.model_name={name}"], False, None))  # its own task
    serving.check_champion_task(recipes.build("emotion", [f"register.model_name={name}"], True, None))  # a smoke run
    serving.check_champion_task(recipes.build("emotion", [], False, None))  # a name with no champion yet
