from components.tokenize import encode_rows
from tuneline import tasks
from tuneline.packing import IGNORE


def test_template_and_answer_only_labels(gpt2_tok):
    row = {"source": "mat the on sat cat the", "target": "the cat sat on the mat"}
    (ex,) = encode_rows(gpt2_tok, [row])
    prompt = gpt2_tok(tasks.descramble_prompt(row["source"]), add_special_tokens=False)["input_ids"]
    answer = gpt2_tok(" the cat sat on the mat", add_special_tokens=False)["input_ids"]
    assert ex.input_ids == prompt + answer + [gpt2_tok.eos_token_id]
    # prompt positions are masked, every answer token and the closing EOS are trained
    assert ex.labels == [IGNORE] * len(prompt) + answer + [gpt2_tok.eos_token_id]
    assert gpt2_tok.decode(ex.input_ids) == "Unscramble: mat the on sat cat the\nSentence: the cat sat on the mat<|endoftext|>"


def test_eos_is_trained_even_though_it_is_also_the_pad_token(gpt2_tok):
    (ex,) = encode_rows(gpt2_tok, [{"source": "b a", "target": "a b"}])
    assert gpt2_tok.pad_token_id == gpt2_tok.eos_token_id
    assert ex.labels[-1] == gpt2_tok.eos_token_id


def test_scramble_is_deterministic_and_keeps_the_words():
    import random

    s = "the quick brown fox jumps over the lazy dog"
    a, b = tasks.scramble(s, random.Random(7)), tasks.scramble(s, random.Random(7))
    assert a == b and a != s and tasks.same_words(a, s)
