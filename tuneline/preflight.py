"""What can be known before the first stage writes, checked before it writes.

Schema checks (types, ranges, choices) live in tuneline/config.py. This adds the checks
that need the files, the model or the store: local data files exist (and are not the
pipeline's own outputs, nor is the base model), the model's config
loads, `tokenize.max_length` fits its positions, LoRA targets name modules it has, the
registered name is one MLflow accepts, `train.nproc` has a GPU or core per process, and
the store answers. `tuneline run` runs it before the flow writes params.yaml,
the flow before its first stage, and every stage process (so `dvc repro` too) before its
work: a run that is going to fail on its params fails here, with nothing replaced.
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import hashlib
import io
import json
import os
from pathlib import Path

from tuneline.config import Params
from tuneline.errors import TunelineError

PASSED_ENV = "TUNELINE_PREFLIGHT_PASSED"  # set by the flow for its stage processes: these params passed


def check_model_name(name: str) -> None:
    """The registered model name, by MLflow's own rule (it refuses names with '/' or ':'
    only when register creates the version, after training)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as e:
        raise TunelineError(
            f"register.model_name {name!r} is not a name MLflow accepts ({e.message.split('. ')[-1].strip('.')})",
            "use letters, digits, '-', '_' and '.' (e.g. team-descrambler)",
        ) from None


def written_folder(path: Path) -> Path | None:
    """The folder of the pipeline's own outputs that holds `path` (data/prepared, models,
    ...: tuneline.data.WRITTEN), or None. A run that reads one replaces what it reads."""
    from tuneline import ROOT
    from tuneline.data import WRITTEN

    path = path.resolve()
    for d in WRITTEN:
        if any(path == out or out in path.parents for out in ((ROOT / d).resolve(), d.resolve())):
            return d
    return None


def check_base_is_not_an_output(name: str) -> None:
    """model.name may not be a folder the pipeline writes: train would replace its own base
    model while reading it, evaluate would then score the new model as the base too (delta
    0), and the merge parity check would fail at register."""
    from tuneline import located

    d = written_folder(located(name))
    if d is not None:
        raise TunelineError(
            f"model.name '{name}' is in {d}/, where this pipeline writes: training would replace the base "
            "model it starts from, and evaluate would compare the new model with itself",
            f"train from a copy (cp -r {name.rstrip('/')} my-base, then --set model.name=my-base), or from a "
            "registered version: tuneline export my-base --version N",
        )


def check_lora_targets(params: Params, model_type: str) -> None:
    """Each LoRA target must name modules of the model (peft matches a module whose name
    is the target or ends in '.target'). The names come from the weight files' headers;
    a model without local safetensors is built on the meta device (no weights, ~2 s)."""
    from tuneline.lora import lora_targets
    from tuneline.modeling import weight_modules

    targets, _ = lora_targets(model_type, params.train)
    names = weight_modules(params.model.name)
    if names is None:
        import torch
        from transformers import AutoModelForCausalLM

        from tuneline.modeling import load_config

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(load_config(params.model.name))
        names = {name for name, module in model.named_modules() if not list(module.children())}
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            close = difflib.get_close_matches(target, sorted(leaves), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"its layers are named: {', '.join(sorted(leaves))}"
            raise TunelineError(
                f"train.lora_targets: model '{params.model.name}' has no module named {target!r}",
                f"{hint} (or leave train.lora_targets empty for the known set)",
            )


def check_sources(params: Params) -> None:
    """Local data files (and dumps) exist, and a local file's first batch of rows passes
    prepare's own validation (columns, text, labels, encoding, format): a misspelled path
    or a wrong column fails before the flow starts. Later rows are prepare's to check."""
    from tuneline import sources
    from tuneline.rows import task_source

    for where, spec in (("prepare.source", params.prepare.source), ("prepare.test_source", params.prepare.test_source)):
        if not spec:
            continue
        if sources.is_wiki(spec):
            sources.dump_path(spec)
        elif not sources.SCHEME.match(spec):  # hub and other schemes: prepare reads (or refuses) them
            for path in sources.local_paths(spec.removeprefix(sources.ALPACA_CHAT)):
                d = written_folder(path)
                if d is None:
                    continue
                if glob.has_magic(spec):
                    fix = f'copy them out first (cp -r {d} my-data, then --set "{where}=my-data/{Path(spec).name}")'
                else:
                    fix = f"copy it out first (cp {os.path.relpath(path)} my-data{path.suffix}, then --set {where}=my-data{path.suffix})"
                raise TunelineError(
                    f"{where} '{spec}' is in {d}/, which this pipeline rewrites: each run would draw its splits "
                    "from the last run's output",
                    fix,
                )
            rows, _ = task_source(spec, params.prepare, where, hashes=False)
            try:  # its notes ("reading column 'target ' as 'target'") are prepare's to print, once
                with contextlib.redirect_stdout(io.StringIO()):
                    next(iter(rows))
            finally:
                rows.close()


def key(params: Params) -> str:
    return hashlib.sha256(json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def passed(params: Params) -> bool:
    """Whether the process that started this one (the flow) already checked these params."""
    return os.environ.get(PASSED_ENV) == key(params)


def check_nproc(nproc: int) -> None:
    """Data-parallel processes the machine can run: one per GPU; on a CPU, at most one per
    core (each holds a whole copy of the model, so more only multiplies the memory)."""
    import torch

    if nproc == 1:
        return
    if torch.cuda.is_available():
        have, what = torch.cuda.device_count(), "GPU(s)"
    else:
        # the cores this process may use (a container's share); macOS has no sched_getaffinity
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        have, what = len(cores), "CPU core(s) and no GPU"
    if nproc > have:
        raise TunelineError(
            f"train.nproc={nproc} data-parallel processes, but this machine has {have} {what}",
            f"set train.nproc to at most {have}",
        )


def check(params: Params, store: bool = True, model: bool = True) -> None:
    """Raise the first problem as one line, or return when the run can start. `model`:
    also check the model (which materialises a built-in model on first use)."""
    from tuneline.modeling import check_vocab, config_dict, position_limit, tokenizer_size

    check_model_name(params.register.model_name)
    check_base_is_not_an_output(params.model.name)
    check_nproc(params.train.nproc)
    check_sources(params)
    if not model:
        if store:
            from tuneline.store import check_store

            check_store()
        return
    cfg = config_dict(params.model.name)
    check_vocab(params.model.name, tokenizer_size(params.model.name), cfg.get("vocab_size"))
    limit = position_limit(cfg)
    if limit is not None and params.tokenize.max_length > limit:
        raise TunelineError(
            f"tokenize.max_length={params.tokenize.max_length} is longer than model "
            f"'{params.model.name}' has positions for ({limit})",
            f"set tokenize.max_length to at most {limit}",
        )
    if params.train.method == "lora":
        from tuneline.lora import check_quantize

        check_lora_targets(params, cfg["model_type"])
        check_quantize(params.train)
    if store:
        from tuneline.store import check_store

        check_store()
