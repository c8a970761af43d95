"""The registered model: an MLflow pyfunc that answers as evaluate scored.

`log_model` logs models/merged (safetensors weights and the tokenizer) as the artifact of
an MLflow *model from code*: the code is tuneline/served_model.py, so nothing is pickled,
and the settings below travel as the model's `model_config`. Wherever the model is loaded
(`mlflow models serve`, `mlflow.pyfunc.load_model`, `tuneline predict`, the gate
re-evaluating an old champion), `Answerer` fills the task's prompt with each request and
decodes as the run's evaluate did: greedy or beam search, in its precision, under the word
constraint for a descrambler (tuneline/constrain.py), each answer cut where evaluate cuts
it (the end of the line, or the next `###` header). A request's params may ask for
{"constrain": "none"} (decode freely), {"num_beams": k}, or, for a classifier,
{"constrain": "labels"}: the declared label whose answer is most likely after the prompt
(evaluate's constrained label scoring, `scored_accuracy`), so the answer is always a label.

Serving needs tuneline importable where the model runs (`--env-manager local` in this
project's environment): the model's code is tuneline's own.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from tuneline import request, tasks
from tuneline.config import Params
from tuneline.errors import TunelineError


def settings(params: Params) -> dict:
    """What the served model needs from the run's params (its `model_config`)."""
    return {
        "task": params.prepare.task,
        "labels": list(params.prepare.labels),
        "max_new_tokens": params.evaluate.max_new_tokens,
        "num_beams": params.evaluate.num_beams,
        "constrain": "words" if params.constrained() else "none",
        "precision": params.evaluate.precision,
        "batch_size": params.evaluate.batch_size,
    }


IDENTITY_TAG = "model.sha256"  # a registered version's `identity`


def identity(params: Params, merged: Path) -> str:
    """What a version serves, as one hash: the merged folder's files (weights, tokenizer,
    config; not the record of the run's params, which holds register.* too) and the
    settings it answers with. A re-run that trains the same weights (the same seed and
    data), or the gate run again with another register.alpha, gives the same identity."""
    import hashlib

    from tuneline.modeling import TRAINED_PARAMS, folder_hash

    files = folder_hash(merged, leave_out=(TRAINED_PARAMS,))
    return hashlib.sha256((files + json.dumps(settings(params), sort_keys=True)).encode()).hexdigest()


def trained_params(folder: str | Path) -> dict | None:
    """The params of the run that made a folder tuneline trained (models/merged, a registered
    version's files, an export), as train wrote them; None when it holds none."""
    import os

    from tuneline.modeling import TRAINED_PARAMS

    path = Path(os.path.expanduser(folder)) / TRAINED_PARAMS
    return json.loads(path.read_text()) if path.is_file() else None


def tuned_for(ref: str) -> tuple[str, list[str]] | None:
    """(task, labels) of a model tuneline tuned, read without loading it: a registered
    version's settings (above), or a model folder's TRAINED_PARAMS (merged, exported). None
    for any other model (a base model, a hub id, a version registered by older tuneline)."""
    from tuneline.store import in_store, use_store

    if in_store(ref):
        use_store()  # as evaluation.load_any reads it
        try:
            config = mlflow.models.get_model_info(ref).flavors.get("python_function", {}).get("config") or {}
        except Exception:  # not found: loading it says so, with its fix
            return None
        return (config["task"], list(config.get("labels") or [])) if "task" in config else None
    prep = (trained_params(ref) or {}).get("prepare")
    return (prep["task"], list(prep.get("labels") or [])) if isinstance(prep, dict) and "task" in prep else None


def differs(found: tuple[str, list[str]] | None, params: Params) -> str | None:
    """'task' or 'labels' when a model tuned for `found` (tuned_for) cannot answer what
    `params` ask (labels as sets: a model answers with their text; their order only maps a
    file's label ids), else None."""
    if found is None:  # not tuned by tuneline: any task
        return None
    task, labels = found
    if task != params.prepare.task:
        return "task"
    return "labels" if tasks.TASKS[task].labelled and labels and set(labels) != set(params.prepare.labels) else None


def check_champion_task(params: Params) -> None:
    """register.model_name holds one task: a run that would register a model of another
    task (or label set) under it is refused before it trains. Else its gate would score the
    champion on prompts it never saw, promote the newcomer, and `tuneline predict` would
    answer a descrambler's input with an emotion label."""
    from tuneline import registry
    from tuneline.store import check_store, open_store

    name = params.register.model_name
    if params.register.dry_run:  # a smoke run registers nothing
        return
    check_store()  # in seconds, where MLflow would retry an unreachable server for minutes
    champ = registry.champion(mlflow.MlflowClient(open_store()), name)  # (may be the store's first use)
    found = champ and tuned_for(f"models:/{name}/{champ.version}")
    what = differs(found, params)
    if what:
        held = f"the {found[0]} task" if what == "task" else f"the labels {found[1]}"
        ours = f"the {params.prepare.task} task" if what == "task" else f"the labels {list(params.prepare.labels)}"
        raise TunelineError(
            f"register.model_name '{name}' holds a model for {held} (champion v{champ.version}), "
            f"and this run trains one for {ours}",
            f"give it a name of its own, e.g. --set register.model_name={name}-{params.prepare.task}",
        )


def log_model(params: Params, merged: Path):
    """Log the model in `merged` (a saved HF model and tokenizer) to the active run."""
    from mlflow.models import ModelSignature, infer_signature

    import tuneline.served_model as code  # the file MLflow stores as the model's code

    config, task = settings(params), tasks.TASKS[params.prepare.task]
    example = [task.serve_example]
    options = {"constrain": config["constrain"], "num_beams": config["num_beams"]}  # a request may override
    signature = infer_signature(example, ["an answer"], params=options)
    if len(task.serve_fields) > 1:
        # A request may be a text or named fields (an instruction and its input). MLflow
        # would cut a frame down to the one string column inferred from the example, so
        # dropping the input's context unread: no input schema, and `_inputs` reads both.
        signature = ModelSignature(inputs=None, outputs=signature.outputs, params=signature.params)
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=code.__file__,
        artifacts={"model": str(merged)},
        model_config=config,
        signature=signature,
        input_example=example,
        # Explicit: MLflow's inference would also pin torchvision, which has no CPU wheel here.
        pip_requirements=[
            f"{pkg}=={metadata.version(pkg)}" for pkg in ("torch", "transformers", "accelerate", "mlflow")
        ],
    )


class Refused(TunelineError, MlflowException):
    """A request refused in one line. tuneline's CLI prints it as any TunelineError; MLflow's
    scoring server answers HTTP 400 with its line (any other exception it reports as "an
    unexpected error while evaluating the model", the line buried in a stack trace)."""

    def __init__(self, problem: str, fix: str | None = None):
        TunelineError.__init__(self, problem, fix)
        MlflowException.__init__(self, str(self), error_code=INVALID_PARAMETER_VALUE)


def _inputs(model_input, task: tasks.Task) -> list:
    """A request's inputs: texts, or named fields (dicts) so that no field is dropped unread.
    MLflow hands over a one-column frame for a model with a string schema, whatever the
    caller sent; without one (tasks with several `serve_fields`), an array of texts, a dict
    of columns (`inputs` as {"instruction": [...], "input": [...]}), or the frame of
    `dataframe_records` / `dataframe_split`, whose rows are the inputs. (A chat conversation
    sent as a list spreads over columns: the first is what chat.request refuses. A chat
    request's body, {"messages": [turns]}, arrives as the frame of that column: MLflow's
    string schema keeps the first column only, so a key beside it is dropped before this.)"""
    if isinstance(model_input, dict):
        columns = {k: np.atleast_1d(np.asarray(v, dtype=object)).tolist() for k, v in model_input.items()}
        if len({len(v) for v in columns.values()}) > 1:
            raise TunelineError(
                "the request's fields have different lengths: "
                + ", ".join(f"{k!r} {len(v)}" for k, v in columns.items()),
                "give every field one value per input",
            )
        model_input = pd.DataFrame(columns)
    if isinstance(model_input, pd.DataFrame):
        named = model_input.shape[1] > 1 or set(map(str, model_input.columns)) <= set(task.serve_fields)
        if named and not task.chat:
            return model_input.to_dict("records")
        return list(model_input.iloc[:, 0])
    if isinstance(model_input, str):
        return [model_input]
    # An array: 0-d for one JSON string; a JSON object's values arrive as (0-d) arrays too
    items = np.atleast_1d(model_input).tolist() if isinstance(model_input, np.ndarray) else list(model_input)
    return [{k: np.asarray(v).tolist() for k, v in x.items()} if isinstance(x, dict) else x for x in items]


def _form(task: tasks.Task) -> str:
    """How to write a request to a `task` model (the fix of a refused one)."""
    fields = ", ".join(f'"{f}"' for f in task.serve_fields)
    named = (
        f"; or name the fields {fields} (JSON text, or a served frame's columns)" if len(task.serve_fields) > 1 else ""
    )
    return f"write it as {task.serve_example!r}{named}"


def _which(i: int, n: int) -> str:
    """Request i of n, as a refusal names it."""
    return f"input {i} of {n}" if n > 1 else "the input"


class Answerer(mlflow.pyfunc.PythonModel):
    """The served model: a tokenizer, the merged model and the run's `settings`."""

    def load_context(self, context) -> None:
        self.load(context.artifacts["model"], context.model_config)

    def load(self, path: str, config: dict) -> Answerer:
        from tuneline.hardware import device
        from tuneline.modeling import load_model, load_tokenizer

        self.model, self.tok, self.config = load_model(path).to(device()).eval(), load_tokenizer(path), config
        return self

    def prompts(self, texts: list) -> list[str]:
        """Each request in the task's prompt, as trained (a chat model's: a user message, or
        the JSON turns of a conversation ending with one, in its chat template); one that
        leaves no room for the answer is refused in one line (generation would crash on it;
        nothing is cut silently)."""
        from tuneline import chat
        from tuneline.modeling import position_limit

        task = tasks.TASKS[self.config["task"]]

        for i, text in enumerate(texts, 1):  # as `tuneline predict` refuses one (predict.inputs)
            if (
                text is None
                or (isinstance(text, float) and text != text)
                or (isinstance(text, str) and not text.strip())
            ):
                raise TunelineError(
                    f"{_which(i, len(texts))} is empty, so there is nothing to answer",
                    f"give the text, e.g. {task.serve_example!r}",
                )
        if task.chat:
            prompts = []
            for i, text in enumerate(texts, 1):
                try:
                    prompts.append(chat.render(self.tok, chat.request(text), True))
                except TunelineError as e:  # which of several requests it is
                    raise TunelineError(
                        f"{_which(i, len(texts))}: {e.problem}" if len(texts) > 1 else e.problem, e.fix
                    ) from None
            # (a served frame's cells arrive as numpy arrays)
            texts = [t if isinstance(t, str) else json.dumps(t, default=lambda a: a.tolist()) for t in texts]
        else:
            texts = [t if isinstance(t, dict) else str(t) for t in texts]
            prompts = []
            for i, text in enumerate(texts, 1):
                try:
                    prompts.append(request.prompt(task, text, self.config["labels"]))
                except ValueError as e:
                    raise TunelineError(f"{_which(i, len(texts))} {str(text)[:80]!r} {e}", _form(task)) from None
            texts = [json.dumps(t) if isinstance(t, dict) else t for t in texts]
        limit, budget = position_limit(self.model.config), self.config["max_new_tokens"]
        for i, (text, prompt) in enumerate(zip(texts, prompts), 1):
            n = len(self.tok(prompt)["input_ids"])
            if limit is not None and n + budget > limit:
                own = len(self.tok(text)["input_ids"])
                raise TunelineError(
                    f"{_which(i, len(texts))} is {n} tokens with its template; with {budget} tokens for the answer the model has "
                    f"positions for {limit}",
                    f"shorten it to under {limit - budget - (n - own)} tokens",
                )
        return prompts

    def words(self, texts: list):
        """The word constraint for a descrambler's inputs `texts`: each answer made of its
        input's words (tuneline/constrain.py)."""
        from tuneline.constrain import WordConstraint

        task = tasks.TASKS[self.config["task"]]
        return WordConstraint(self.tok, [task.words(request.row(task, t)) for t in texts])

    def fits_words(self, texts: list) -> None:
        """Refuse, in one line, an input whose words take more tokens than the model's answer
        budget: kept to them, its answer would be cut with words left out."""
        task, budget = tasks.TASKS[self.config["task"]], int(self.config["max_new_tokens"])
        for i, text in enumerate(texts, 1):
            n = len(self.tok(task.words(request.row(task, text)))["input_ids"])
            if n > budget:
                raise TunelineError(
                    f"{_which(i, len(texts))} is {n} tokens of words to put in order, but this model answers in at most {budget} "
                    "tokens (evaluate.max_new_tokens), so its answer would leave words out",
                    f"split it into shorter inputs (under {budget} tokens each), e.g. one sentence each",
                )

    def likeliest_labels(self, prompts: list[str]) -> list[str]:
        """Per prompt, the label whose answer (+ EOS, as trained) is most likely after it:
        the prompt is read once and every label scored from its cache, as evaluate does."""
        from tuneline.generation import answer
        from tuneline.hardware import autocast
        from tuneline.tokenization import encode

        task, labels = tasks.TASKS[self.config["task"]], self.config["labels"]
        branch = [a + [self.tok.eos_token_id] for a in encode(self.tok, [task.answer({"label": x}) for x in labels])]
        with autocast(self.config["precision"]):
            _, logp, _ = answer(
                self.model,
                self.tok,
                prompts,
                0,
                self.config["batch_size"],
                branches=[branch] * len(prompts),
                show=False,
            )
        return [labels[max(range(len(labels)), key=lp.__getitem__)] for lp in logp]

    # Annotated as a frame, which MLflow infers no schema from: the logged signature (with
    # its params) stays the one `log_model` gives.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        try:
            return self.answer(model_input, params)
        except TunelineError as e:
            raise Refused(e.problem, e.fix) from None

    def answer(self, model_input, params: dict | None) -> list[str]:
        """The answers to a request (`predict`'s, before a refusal is made MLflow's)."""
        from tuneline.generation import generate
        from tuneline.hardware import autocast

        cfg = self.config
        opts = {"constrain": cfg["constrain"], "num_beams": cfg["num_beams"]} | (params or {})
        task = tasks.TASKS[cfg["task"]]
        applies = ["none"] + ["words"] * bool(task.words) + ["labels"] * bool(task.labelled and cfg["labels"])
        if opts["constrain"] not in applies:
            raise TunelineError(
                f"constrain '{opts['constrain']}' does not apply to a model of the {task.name} task",
                "ask for " + " or ".join(f"'{c}'" for c in applies),
            )
        if int(opts["num_beams"]) < 1:  # generate would fail deep inside on it
            raise TunelineError(f"num_beams {opts['num_beams']} is not a number of beams", "ask for 1 (greedy) or more")
        # (MLflow fills a param the request left out with the model's default: only another
        # number of beams is one the request asked for)
        if opts["constrain"] == "labels" and int(opts["num_beams"]) != int(cfg["num_beams"]):
            raise TunelineError(
                f"num_beams {opts['num_beams']} does not apply to constrain 'labels': it scores the labels, it does "
                "not decode",
                "leave out num_beams (as `tuneline predict --labels` refuses --beams)",
            )
        texts = _inputs(model_input, task)
        prompts = self.prompts(texts)
        if opts["constrain"] == "labels":
            return self.likeliest_labels(prompts)
        words = None
        if opts["constrain"] == "words":
            self.fits_words(texts)
            words = self.words(texts)
        with autocast(cfg["precision"]):
            return generate(
                self.model,
                self.tok,
                prompts,
                cfg["max_new_tokens"],
                cfg["batch_size"],
                int(opts["num_beams"]),
                task.stop,
                constraint=words,
                show=False,  # a request prints nothing
            )
