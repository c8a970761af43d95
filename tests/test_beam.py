"""Beam search from one encoding of each prompt gives transformers' beam search answers."""

import pytest
import torch
from conftest import generate_beams, tiny_llama

from tuneline.generation import answer

PROMPTS = [  # of different lengths, so that the batch is left-padded
    "Unscramble: dog the barked\nSentence:",
    "Unscramble: a long river ran past the quiet town at night\nSentence:",
    "Unscramble: snow\nSentence:",
    "Unscramble: five men the field crossed slowly\nSentence:",
    "Unscramble: y z\nSentence:",
    "Unscramble: the old clock on the wall stopped\nSentence:",
]


@pytest.fixture(scope="module")
def eos_prone(gpt2_tok):
    """A random tiny Llama whose EOS is likely at every step, so that hypotheses end at
    different lengths and compete: what exercises the finished hypotheses, their length
    normalisation and the 2k continuations kept per step."""
    model = tiny_llama(len(gpt2_tok))
    with torch.no_grad():
        model.lm_head.weight[gpt2_tok.eos_token_id] = model.model.norm.weight  # along every hidden state's mean
    return model


@pytest.mark.parametrize("num_beams", [2, 3, 4])
def test_beam_search_answers_as_transformers_generate(eos_prone, gpt2_tok, num_beams):
    expected = generate_beams(eos_prone, gpt2_tok, PROMPTS, 10, num_beams)
    outs, _, ended = answer(eos_prone, gpt2_tok, PROMPTS, 10, 4, num_beams, stop=None)
    assert outs == expected
    assert len({len(o.split()) for o in outs}) > 1 and any(ended)  # answers did end at different lengths
