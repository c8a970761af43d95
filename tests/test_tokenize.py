"""Each task's template, rendered exactly, and its loss mask: prompt masked, answer + EOS trained."""

import json

import pytest

from components import tokenize
from tuneline import tasks, tokenization
from tuneline.errors import TunelineError
from tuneline.packing import IGNORE
from tuneline.tokenization import encode_rows

EMOTIONS = ["sadness", "joy", "love", "anger", "fear", "surprise"]
CASES = [
    (
        "descramble",
        {"source": "mat the on sat cat the", "target": "the cat sat on the mat"},
        [],
        "Unscramble: mat the on sat cat the\nSentence:",
        " the cat sat on the mat",
    ),
    ("pretrain", {"text": "Paris is the capital of France."}, [], "", "Paris is the capital of France."),
    (
        "instruct",
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        [],
        "### Instruction:\nAdd the numbers.\n\n### Context:\n2 and 3\n\n### Response:\n",
        "5",
    ),
    (
        "instruct",
        {"instruction": "Name a colour.", "input": "", "output": "Red."},
        [],
        "### Instruction:\nName a colour.\n\n### Response:\n",
        "Red.",
    ),
    (
        "classify",
        {"text": "i feel wonderful", "label": "joy"},
        EMOTIONS,
        "Text: i feel wonderful\nOptions: sadness, joy, love, anger, fear, surprise\nAnswer:",
        " joy",
    ),
    (
        "entail",
        {"premise": "A man walks.", "hypothesis": "A man moves.", "label": "entailment"},
        [],
        "mnli hypothesis: A man moves. premise: A man walks. target:",
        " entailment",
    ),
]


@pytest.mark.parametrize("name, row, labels, prompt, answer", CASES)
def test_template_renders_exactly_and_masks_the_prompt(gpt2_tok, name, row, labels, prompt, answer):
    task = tasks.TASKS[name]
    assert tasks.render(task, row, labels) == (prompt, answer)
    (ex,) = encode_rows(gpt2_tok, [row], task, labels)
    p = gpt2_tok(prompt, add_special_tokens=False)["input_ids"]
    a = gpt2_tok(answer, add_special_tokens=False)["input_ids"]
    eos = gpt2_tok.eos_token_id
    assert ex.input_ids == p + a + [eos]
    assert ex.labels == [IGNORE] * len(p) + a + [eos]  # the closing EOS is trained, though it is also pad
    assert gpt2_tok.decode(ex.input_ids) == prompt + answer + "<|endoftext|>"


def test_ids_never_carry_padding_left_on_by_a_padded_call(gpt2_tok):
    texts = ["a", "a much longer text than the first"]
    clean = tokenization.encode(gpt2_tok, texts)
    gpt2_tok.padding_side = "left"
    gpt2_tok(texts, padding=True)  # what batched generation does before perplexity is scored
    assert tokenization.encode(gpt2_tok, texts) == clean == [gpt2_tok(t)["input_ids"] for t in texts]


def test_parse_label_takes_whole_leading_words():
    assert tasks.parse_label(" Joy.", EMOTIONS) == "joy"
    assert tasks.parse_label("joyful", EMOTIONS) is None
    assert tasks.parse_label("", EMOTIONS) is None
    assert tasks.parse_label("not sure", ["not", "not sure"]) == "not sure"


def test_scramble_is_deterministic_and_keeps_the_words():
    import random

    s = "the quick brown fox jumps over the lazy dog"
    a, b = tasks.scramble(s, random.Random(7)), tasks.scramble(s, random.Random(7))
    assert a == b and a != s and tasks.same_words(a, s)


def test_tokenize_stage_writes_stats_and_its_key(tmp_path, monkeypatch, model_cache):
    from conftest import TINY

    from components import prepare
    from tuneline.params_file import parse_params

    monkeypatch.chdir(tmp_path)
    params = parse_params({**TINY, "prepare": {"n_train": 60, "n_val": 8, "n_test": 8}})
    prepare.run(params)
    m = tokenize.run(params)
    assert {
        "pad_share",
        "tokens_per_sequence",
        "examples_per_sequence",
        "truncated_examples",
        "trainable_token_share",
    } <= set(m["train"])
    assert json.loads((tmp_path / "metrics/tokenize.json").read_text())["train"] == m["train"]
    meta = json.loads((tmp_path / "data/tokenized/meta.json").read_text())
    assert meta["template_version"] == tasks.TEMPLATE_VERSION and meta["packing"] == "bfd"
    from tuneline.modeling import load_tokenizer

    assert meta["tokenizer_sha256"] == tokenization.tokenizer_hash(load_tokenizer("tiny-gpt2"))
    tokenization.check_tokenizer(load_tokenizer("tiny-gpt2"))  # same tokenizer: fine
    with pytest.raises(TunelineError, match="different tokenizer"):
        other = load_tokenizer("tiny-gpt2")
        other.add_tokens(["<new>"])
        tokenization.check_tokenizer(other)
