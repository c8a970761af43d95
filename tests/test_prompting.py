"""The base model's promptings render what they should, and a shared prefix generates and
scores exactly as the whole text would."""

import pytest

from tuneline import prompting, tasks
from tuneline.config import Params
from tuneline.errors import TunelineError
from tuneline.generation import answer
from tuneline.modeling import load_tokenizer
from tuneline.tasks import DESCRAMBLE_PROMPT

TRAIN = [{"source": f"b{i} a{i}", "target": f"A{i} b{i}."} for i in range(20)]
TEST = [{"source": "mat the on", "target": "On the mat."}, {"source": "dog a", "target": "A dog."}]
EMOTIONS = ["sadness", "joy", "love", "anger", "fear", "surprise"]


def _params(**evaluate) -> Params:
    return Params.model_validate({"model": {"name": "tiny-gpt2"}, "evaluate": evaluate})


def test_chat_puts_the_prompt_in_the_models_chat_template():
    tok = load_tokenizer("smollm2-135m-instruct")
    how = prompting.chat(tok)
    prompt = DESCRAMBLE_PROMPT.format(source=TEST[0]["source"])
    turn = [{"role": "user", "content": prompt}]
    assert how.texts([prompt]) == [tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)]
    assert how.texts([prompt])[0].endswith("<|im_start|>assistant\n")
    assert prompting.chat(load_tokenizer("tiny-gpt2")) is None  # GPT-2 has no chat template


def test_few_shot_shows_k_solved_training_examples_then_the_prompt():
    task = tasks.TASKS["descramble"]
    shots = prompting.pick_shots(TRAIN, 3, seed=1, task=task)
    how = prompting.few_shot(task, shots, [])
    text = how.texts([task.prompt(TEST[0], [])])[0]
    blocks = text.split(prompting.SHOT_SEP)
    assert len(blocks) == 4 and blocks[-1] == "Unscramble: mat the on\nSentence:"
    for block, shot in zip(blocks, shots):
        assert block == f"Unscramble: {shot['source']}\nSentence: {shot['target']}"  # solved, as trained
    assert all(s in TRAIN for s in shots) and not any(t["target"] in text for t in TEST)
    assert prompting.pick_shots(TRAIN, 3, seed=1, task=task) == shots  # seeded
    assert prompting.pick_shots(TRAIN, 3, seed=2, task=task) != shots


def test_few_shot_for_labels_shows_each_label_before_any_twice():
    rows = [{"text": f"t{i}", "label": "joy"} for i in range(30)] + [{"text": "x", "label": "fear"}]
    shots = prompting.pick_shots(rows, 2, seed=0, task=tasks.TASKS["classify"])
    assert sorted(s["label"] for s in shots) == ["fear", "joy"]


def test_auto_tries_every_prompting_that_applies_and_says_why_not_the_others():
    train = lambda: TRAIN  # noqa: E731
    found, skipped = prompting.candidates(_params(), load_tokenizer("tiny-gpt2"), train)
    assert [p.kind for p in found] == ["plain", "few_shot"] and "no chat template" in skipped[0]
    found, _ = prompting.candidates(_params(), load_tokenizer("smollm2-135m-instruct"), train)
    assert [p.kind for p in found] == ["plain", "chat", "few_shot"]
    found, skipped = prompting.candidates(_params(base_shots=0), load_tokenizer("tiny-gpt2"), train)
    assert [p.kind for p in found] == ["plain"] and "base_shots is 0" in skipped[1]
    with pytest.raises(TunelineError, match="base_prompting 'chat' does not apply.*no chat template"):
        prompting.candidates(_params(base_prompting="chat"), load_tokenizer("tiny-gpt2"), train)
    # prompts that would not fit the model's positions with the shots: left out, or refused when asked for
    long = ["Unscramble: " + "word " * 900 + "\nSentence:"]
    found, skipped = prompting.candidates(_params(), load_tokenizer("tiny-gpt2"), train, long, 1024)
    assert [p.kind for p in found] == ["plain"] and "more than the model's 1024 positions" in skipped[-1]
    with pytest.raises(TunelineError, match="'few_shot' does not apply.*1024 positions.*lower evaluate.base_shots"):
        prompting.candidates(_params(base_prompting="few_shot"), load_tokenizer("tiny-gpt2"), train, long, 1024)


def test_the_best_prompting_is_chosen_on_the_primary_metric():
    res = {"plain": {"chrf": 12.0, "perplexity": 9.0}, "chat": {"chrf": 30.0, "perplexity": 20.0}}
    assert prompting.best(res, "chrf") == "chat"
    assert prompting.best(res, "perplexity") == "plain"  # lower is better
    assert prompting.best({"plain": {"chrf": 5.0}, "few_shot": {"chrf": 5.0}}, "chrf") == "plain"


@pytest.mark.parametrize("num_beams", [1, 2])
def test_a_shared_prefix_answers_and_scores_as_the_whole_text_alone(tiny_gpt2, gpt2_tok, num_beams):
    """The few-shot prefix is encoded once and every batch reads its cache; the prompts are
    left-padded after it. Outputs and answer scores equal each whole prompt, one at a time."""
    task = tasks.TASKS["descramble"]
    how = prompting.few_shot(task, TRAIN[:3], [])
    rows = TEST + [{"source": "one two three four five six seven", "target": "x"}]
    prompts = [task.prompt(r, []) for r in rows]
    branches = [[gpt2_tok(" " + r["target"])["input_ids"] + [gpt2_tok.eos_token_id]] for r in rows]
    out, lp, _ = answer(tiny_gpt2, gpt2_tok, how.wrap(prompts), 6, 3, num_beams, branches=branches, prefix=how.prefix)
    for i, text in enumerate(how.texts(prompts)):
        o, alone, _ = answer(tiny_gpt2, gpt2_tok, [text], 6, 1, num_beams, branches=[branches[i]])
        assert out[i] == o[0]
        assert lp[i][0] == pytest.approx(alone[0][0], abs=1e-4)


def test_evaluate_on_a_file_prompts_as_asked_and_refuses_what_does_not_apply(tmp_path, monkeypatch, model_cache):
    """`tuneline evaluate --prompting`: the same record as evaluate gives the base model under
    that prompting; one that does not apply (or shots of another task) is one line."""
    from tuneline import evaluation
    from tuneline.modeling import load_model

    data = tmp_path / "t.csv"
    data.write_text("target\n" + "".join(f"{r['target']}\n" for r in TEST))
    monkeypatch.setattr(prompting, "train_sample", lambda: TRAIN)
    params = _params(max_new_tokens=6, base_shots=2)
    got = evaluation.evaluate_file("tiny-gpt2", params, str(data), kind="few_shot")
    rows, _ = evaluation.splits.file_rows(str(data), params)
    task, tok = tasks.TASKS["descramble"], load_tokenizer("tiny-gpt2")
    how = prompting.few_shot(task, prompting.pick_shots(TRAIN, 2, params.seed, task), [])
    want = evaluation.evaluate_model(load_model("tiny-gpt2"), tok, rows, params, how)
    plain = evaluation.evaluate_file("tiny-gpt2", params, str(data))
    untimed = lambda m: {k: v for k, v in m.items() if not k.endswith("_s")}  # noqa: E731
    assert got["prompting"] == "few_shot"
    assert untimed(got["metrics"]) == untimed(evaluation.metrics_of(want, rows, params))
    assert got["metrics"]["perplexity"] != plain["metrics"]["perplexity"]  # the shots were read
    with pytest.raises(TunelineError, match="--prompting chat does not apply to tiny-gpt2: .*no chat template"):
        evaluation.evaluate_file("tiny-gpt2", params, str(data), kind="chat")
    monkeypatch.setattr(prompting, "train_sample", lambda: [{"text": "i am glad", "label": "joy"}])
    with pytest.raises(TunelineError, match="few_shot does not apply.*holds no descramble rows"):
        evaluation.evaluate_file("tiny-gpt2", params, str(data), kind="few_shot")
