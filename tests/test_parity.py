"""Merge parity (tuneline/parity.py): register refuses a merged model that does not
reproduce the adapted one, and records the figures when it does."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tuneline import parity, recipes
from tuneline.errors import TunelineError

ROWS = [{"source": s, "target": s} for s in ("the cat sat", "was founded The university", "home went I", "a b c d")]


@pytest.fixture
def trained(tmp_path, monkeypatch, tiny_gpt2, gpt2_tok):
    """A LoRA-adapted tiny-gpt2 with a non-zero adapter, saved as train saves it: the
    adapter, and the merged model with the tokenizer."""
    import copy

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(parity, "ADAPTER", tmp_path / "models/adapter")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    model = get_peft_model(copy.deepcopy(tiny_gpt2), lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # B starts at zero: make the adapter change the answers
    model.save_pretrained(tmp_path / "models/adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "models/merged")
    gpt2_tok.save_pretrained(tmp_path / "models/merged")
    params = recipes.build(None, ["model.name=tiny-gpt2", "register.parity_prompts=4"], False, None)
    return params, tmp_path / "models/merged", merged


def test_a_true_merge_passes_and_its_figures_become_tags(trained):
    params, folder, _ = trained
    tags = parity.check(params, ROWS, folder)
    assert tags["parity.greedy_agree"] == "4/4"
    assert float(tags["parity.max_logit_diff"]) <= params.register.parity_tol
    assert tags["parity.tolerance"] == str(params.register.parity_tol)


def test_a_broken_merge_is_refused_in_one_line(trained, tiny_gpt2):
    params, folder, merged = trained
    # The merge bug peers report most: the adapter left out (the base model's weights saved).
    tiny_gpt2.save_pretrained(folder)
    with pytest.raises(
        TunelineError,
        match=r"does not reproduce the adapted one \(largest logit difference .* > "
        r"register.parity_tol=0.001; only \d/4 greedy answers the same\)",
    ):
        parity.check(params, ROWS, folder)


def test_the_answers_compared_are_the_greedy_answers(trained, gpt2_tok):
    """`compare` counts a row the same exactly when the adapted model's own greedy decoding
    gives the merged model's answer: checked against decoding it."""
    from peft import PeftModel

    from tuneline.generation import generate
    from tuneline.modeling import load_model

    params, folder, merged = trained
    prompts = [f"Unscramble: {r['source']}\nSentence:" for r in ROWS]
    adapted = PeftModel.from_pretrained(load_model("tiny-gpt2"), parity.ADAPTER).eval()
    for other, expect in ((merged, 4), (load_model("tiny-gpt2"), 0)):  # the base model answers otherwise
        _, same = parity.compare(adapted, other, gpt2_tok, prompts, 12, "\n")
        a, b = (generate(m, gpt2_tok, prompts, 12, 4, 1, "\n", show=False) for m in (adapted, other))
        assert same == sum(x == y for x, y in zip(a, b)) == expect


def test_full_fine_tuning_has_nothing_to_compare():
    params = recipes.build(None, ["model.name=tiny-gpt2", "train.method=full"], False, None)
    assert "not applicable" in parity.check(params, ROWS, "unused")["parity"]
