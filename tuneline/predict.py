"""`tuneline predict`: one answer from a model in the MLflow registry (or any MLflow model URI).

A registered model is an mlflow.transformers text-generation pipeline that carries its
task's prompt template. Served through MLflow it decodes freely. Here, a model whose run
was evaluated under the word constraint (`evaluate.constrain`, tuneline/constrain.py: a
descrambler) answers under it too, so `predict` gives what evaluate scored: the input's
words, each used once, in the model's order. `free=True` asks the pipeline itself.
"""

from __future__ import annotations

import re

from tuneline import tasks
from tuneline.errors import TunelineError


def load(uri: str):
    """The pyfunc model at `uri`, or one line saying why not."""
    import mlflow

    try:
        return mlflow.pyfunc.load_model(uri)
    except Exception as e:  # MlflowException, missing artifacts
        raise TunelineError(
            f"cannot load '{uri}' ({str(e).splitlines()[0][:120]})",
            "check the URI with `tuneline history` or the MLflow UI",
        ) from None


def run_params(client, uri: str) -> dict[str, str]:
    """The flattened params of the run that logged the model at `uri` ({} when unknown)."""
    from mlflow.exceptions import MlflowException

    try:
        if m := re.fullmatch(r"models:/([^/@]+)@(.+)", uri):
            run_id = client.get_model_version_by_alias(*m.groups()).run_id
        elif m := re.fullmatch(r"models:/([^/@]+)/(\d+)", uri):
            run_id = client.get_model_version(*m.groups()).run_id
        elif m := re.fullmatch(r"runs:/([^/]+)/.*", uri):
            run_id = m.group(1)
        else:
            return {}
        return dict(client.get_run(run_id).data.params) if run_id else {}
    except MlflowException:
        return {}


def word_task(params: dict[str, str]):
    """The run's task when its answers were decoded under the word constraint, else None."""
    task = tasks.TASKS.get(params.get("prepare.task", ""))
    mode = params.get("evaluate.constrain", "auto")
    if task is None or task.words is None or mode == "none":
        return None
    return task


def _pipeline(loaded):
    impl = getattr(loaded, "_model_impl", None)  # mlflow.transformers' pyfunc wrapper
    pipe = getattr(impl, "pipeline", None)
    if pipe is None or getattr(pipe, "tokenizer", None) is None:
        return None, None, 0
    template = getattr(impl, "prompt_template", None) or "{prompt}"
    budget = int((getattr(impl, "model_config", None) or {}).get("max_new_tokens", 0))
    return pipe, template, budget


def check_length(loaded, text: str) -> None:
    """Refuse, in one line, an input the model has no positions for (templated prompt plus
    the answer budget); generation would crash on it. A lone input is never cut silently."""
    from tuneline.modeling import position_limit

    pipe, template, budget = _pipeline(loaded)
    if pipe is None:
        return
    limit = position_limit(pipe.model.config)
    n = len(pipe.tokenizer(template.replace("{prompt}", text))["input_ids"])
    if limit is not None and n + budget > limit:
        raise TunelineError(
            f"the input is {n} tokens with its template; with {budget} tokens for the answer the model has "
            f"positions for {limit}",
            f"shorten it to under {limit - budget - (n - len(pipe.tokenizer(text)['input_ids']))} tokens",
        )


def answer(loaded, text: str, task=None, num_beams: int = 1) -> str:
    """The model's answer to `text`; with a word `task`, decoded under its word constraint
    (greedy, or beam search as the run's evaluate did; the template filled as MLflow fills it)."""
    pipe, template, budget = _pipeline(loaded)
    if task is None or pipe is None:
        out = loaded.predict([text])
        return str(out[0] if isinstance(out, list) else out).strip()
    from tuneline.constrain import WordConstraint
    from tuneline.generation import generate

    words = WordConstraint(pipe.tokenizer, [task.words({task.serve_field: text})])
    prompt = template.replace("{prompt}", text)
    return generate(
        pipe.model, pipe.tokenizer, [prompt], budget or 128, 1, num_beams, one_line=task.one_line, constraint=words
    )[0]
