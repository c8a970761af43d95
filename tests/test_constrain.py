"""Constrained decoding keeps the input's words, on any tokenizer split, greedy and beam."""

import ast
from pathlib import Path

import pytest
from conftest import generate_beams

from tuneline import recipes
from tuneline.constrain import WordConstraint
from tuneline.errors import TunelineError
from tuneline.generation import generate
from tuneline.tasks import DESCRAMBLE_PROMPT, same_words

SOURCES = [
    "sat the cat mat. on the",
    "hills",
    "Göbel Kurt met the the in 1990 Berlin, again",
    "over ran dogs the old red barns near the river",
    "x y",
]


def _prompts():
    return [DESCRAMBLE_PROMPT.format(source=s) for s in SOURCES]


def _budget(tok) -> int:
    """Enough tokens for any split: one per byte of the longest input, and EOS."""
    return max(len(s.encode()) for s in SOURCES) + 2


@pytest.mark.parametrize("num_beams", [1, 3])
def test_every_answer_uses_exactly_the_inputs_words(tiny_gpt2, gpt2_tok, num_beams):
    """An untrained model, left alone, writes anything; constrained, each answer is a
    permutation of its input's words (repeats and punctuation included), greedy and beam."""
    words = WordConstraint(gpt2_tok, SOURCES)
    free = generate(tiny_gpt2, gpt2_tok, _prompts(), 12, batch_size=5, num_beams=num_beams)
    assert not all(same_words(o, s) for o, s in zip(free, SOURCES))
    outs = generate(tiny_gpt2, gpt2_tok, _prompts(), _budget(gpt2_tok), 5, num_beams, constraint=words)
    for out, src in zip(outs, SOURCES):
        assert same_words(out, src), (out, src)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_constrained_answers_in_a_batch_equal_each_prompt_alone(tiny_gpt2, gpt2_tok, num_beams):
    words = WordConstraint(gpt2_tok, SOURCES)
    batched = generate(tiny_gpt2, gpt2_tok, _prompts(), _budget(gpt2_tok), 5, num_beams, constraint=words)
    alone = [
        generate(tiny_gpt2, gpt2_tok, [p], _budget(gpt2_tok), 1, num_beams, constraint=WordConstraint(gpt2_tok, [s]))[0]
        for p, s in zip(_prompts(), SOURCES)
    ]
    assert batched == alone


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_projecting_only_the_allowed_tokens_picks_what_the_whole_head_picks(
    tiny_gpt2, gpt2_tok, precision, monkeypatch
):
    """Under bf16 autocast on the CPU, a constrained step computes the output head's columns
    of the tokens some row may emit, not all 50k: the answers are those of the whole head,
    masked. In fp32 (columns of other widths may round 1 ulp apart) the whole head runs."""
    import torch

    from tuneline import constrain
    from tuneline.hardware import autocast

    words = WordConstraint(gpt2_tok, SOURCES)
    budget = _budget(gpt2_tok)
    with autocast(precision):
        head = constrain.output_head(tiny_gpt2)
        assert (head is not None) == (precision == "bf16")
        fast = generate(tiny_gpt2, gpt2_tok, _prompts(), budget, batch_size=5, constraint=words)
        # one step's logits, both ways: the allowed ones equal, every other one -inf
        x, allowed = torch.tensor([[464], [3797]]), [[13, 262, 3797], [50256, 11]]
        with torch.no_grad():
            got, ids = constrain.allowed_logits(tiny_gpt2, head, x, allowed, {})
            ref = constrain.only(tiny_gpt2(input_ids=x).logits[:, -1], allowed)
        monkeypatch.setattr(constrain, "HEAD_LAST", ())  # every step through the whole head
        whole = generate(tiny_gpt2, gpt2_tok, _prompts(), budget, batch_size=5, constraint=words)
    assert fast == whole and all(same_words(o, s) for o, s in zip(fast, SOURCES))
    assert torch.equal(got, ref[:, ids]) and int(torch.isfinite(got).sum()) == 5
    assert ids.tolist() == ([11, 13, 262, 3797, 50256] if head else list(range(len(gpt2_tok))))


def test_a_word_may_come_in_any_split_and_nothing_else_may_follow(gpt2_tok):
    """Allowed next tokens keep the text a prefix of some order of the words; a word may be
    spelt in pieces (here byte by byte, through a non-ASCII letter); EOS only at the end."""
    words = WordConstraint(gpt2_tok, ["Göbel met Kurt"])

    def allowed_texts(text: str) -> set[str]:
        ids = gpt2_tok(text, add_special_tokens=False)["input_ids"] if text else []
        return {gpt2_tok.decode([t]) for t in words.allowed(0, ids)}

    first = allowed_texts("")
    assert {" Kurt", "K", " met"} <= first and gpt2_tok.eos_token not in first
    assert all(any(w.startswith(t.lstrip()) for w in ("Göbel", "met", "Kurt")) for t in first if t.strip())
    after_met = allowed_texts(" met")
    assert " Kurt" in after_met and " met" not in after_met  # "met" was used up
    spelt = [gpt2_tok.convert_tokens_to_ids(t) for t in ("Ġ", "G", "Ã", "¶")]  # " Gö", "ö" as its two bytes
    for i in range(len(spelt)):
        assert spelt[i] in words.allowed(0, spelt[:i])
    assert gpt2_tok.decode(spelt) == " Gö"
    assert words.allowed(0, gpt2_tok(" met Kurt Göbel", add_special_tokens=False)["input_ids"]) == [
        gpt2_tok.eos_token_id
    ]


def test_words_constraint_is_refused_for_a_task_without_words():
    with pytest.raises(TunelineError, match="evaluate.constrain 'words'.*use evaluate.constrain: auto or none"):
        recipes.build("emotion", ["evaluate.constrain=words"])
    with pytest.raises(TunelineError, match="prompt_lookup"):
        recipes.build("descramble", ["evaluate.prompt_lookup=2"])
    assert recipes.build("descramble", []).constrained()
    assert not recipes.build("emotion", []).constrained()


@pytest.mark.parametrize("num_beams", [2, 4])
def test_constrained_beam_search_answers_as_transformers_generate_with_the_logits_processor(
    tiny_gpt2, gpt2_tok, num_beams
):
    """Our beam search (one prompt encoding, rows leaving the batch when done) gives what
    transformers' `generate` gives with the constraint as its LogitsProcessor, batched."""
    rows = list(range(len(SOURCES)))
    processor = lambda width: WordConstraint(gpt2_tok, SOURCES).processor(rows, width, num_beams)  # noqa: E731
    expected = generate_beams(tiny_gpt2, gpt2_tok, _prompts(), _budget(gpt2_tok), num_beams, processor)
    words = WordConstraint(gpt2_tok, SOURCES)
    assert generate(tiny_gpt2, gpt2_tok, _prompts(), _budget(gpt2_tok), 3, num_beams, constraint=words) == expected


@pytest.mark.parametrize("num_beams", [1, 3])
def test_the_custom_generate_entry_point_answers_as_tuneline_batched(tiny_gpt2, gpt2_tok, num_beams):
    """`constrain.generate` is what an exported descrambler runs inside transformers'
    `generate` (custom_generate/generate.py): with `words`, a left-padded batch answers as
    tuneline's constrained decoding; without, it is plain `generate`."""
    import torch

    from tuneline import constrain

    gpt2_tok.padding_side = "left"
    enc = gpt2_tok(_prompts(), return_tensors="pt", padding=True, add_special_tokens=False)
    width = enc["input_ids"].shape[1]
    opts = {"max_new_tokens": _budget(gpt2_tok), "num_beams": num_beams, "do_sample": False}
    opts |= {"pad_token_id": gpt2_tok.eos_token_id, "eos_token_id": gpt2_tok.eos_token_id}
    with torch.no_grad():
        out = constrain.generate(tiny_gpt2, words=SOURCES, tokenizer=gpt2_tok, **enc, **opts)
        free = constrain.generate(tiny_gpt2, **enc, **opts)
        plain = tiny_gpt2.generate(**enc, **opts)
    answers = [gpt2_tok.decode(r, skip_special_tokens=True).strip() for r in out[:, width:]]
    words = WordConstraint(gpt2_tok, SOURCES)
    assert answers == generate(tiny_gpt2, gpt2_tok, _prompts(), _budget(gpt2_tok), 5, num_beams, constraint=words)
    assert all(same_words(a, s) for a, s in zip(answers, SOURCES))
    assert torch.equal(free, plain)
    with pytest.raises(ValueError, match="one string of words per prompt"):
        constrain.generate(tiny_gpt2, words=SOURCES[:2], tokenizer=gpt2_tok, **enc, **opts)


def test_the_module_runs_without_tuneline():
    """`tuneline export` ships constrain.py as an exported model's custom_generate/generate.py,
    which its users run with transformers alone: it imports nothing else."""
    from tuneline import constrain

    tree = ast.parse(Path(constrain.__file__).read_text())
    roots = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert roots <= {"__future__", "bisect", "collections", "functools", "torch", "transformers"}, roots
