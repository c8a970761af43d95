from tuneline import assets


def test_gpt2_tokenizer_is_the_official_bpe(gpt2_tok):
    assert gpt2_tok("Hello world")["input_ids"] == [15496, 995]
    assert len(gpt2_tok) == 50257 and gpt2_tok.eos_token_id == 50256
    assert gpt2_tok.pad_token_id == gpt2_tok.eos_token_id


def test_offline_assets_are_in_their_packages():
    assert assets.wiki_dump().stat().st_size > 1_000_000
    assert assets.smollm2_gguf().stat().st_size > 50_000_000
