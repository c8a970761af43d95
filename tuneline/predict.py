"""`tuneline predict`: answers from a model in the MLflow registry (or any MLflow model URI,
or a folder tuneline trained), to one input, several, or stdin's lines (`-`), in requests of CHUNK inputs.

A registered model answers as the run's evaluate scored (tuneline/serving.py): the task's
prompt filled with the input, decoded greedily or by beam search, a descrambler under the
word constraint (the input's words, each used once, in the model's order). `--free` asks it
to decode freely; `--labels` asks a classifier for its most likely label. Versions
registered by older tuneline (MLflow's transformers flavour) answer freely either way.
"""

from __future__ import annotations

import shlex

from tuneline.errors import TunelineError


def load(uri: str):
    """The pyfunc model at `uri` (or a folder tuneline trained: `Folder`), or one line saying why not."""
    import os

    import mlflow

    if ":" not in uri and not (uri.strip() and os.path.exists(uri)):  # MLflow said "No such artifact"
        raise TunelineError(
            f"--model '{uri}' is not a model URI, and no folder '{os.path.abspath(uri)}' exists"
            if uri.strip()
            else "--model is empty",  # '' is the working directory to os.path
            "give models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or an MLflow model folder; "
            "see `tuneline history`",
        )
    hf_folder = os.path.isfile(os.path.join(uri, "config.json")) and not os.path.isfile(os.path.join(uri, "MLmodel"))
    if hf_folder:  # models/merged, an export: with its run's params, it answers as registered
        trained = Folder.of(uri)
        if trained is not None:
            return trained
        raise TunelineError(
            f"--model '{uri}' is a Hugging Face model folder, not an MLflow model: it holds no task, "
            "prompt or decoding to answer with",
            f"evaluate it with `tuneline evaluate --model {uri} --data FILE`, or predict with a registered "
            "version (models:/NAME@champion; `tuneline history` lists them)",
        )
    try:
        return mlflow.pyfunc.load_model(uri)
    except Exception as e:  # MlflowException, missing artifacts
        raise TunelineError(
            f"cannot load '{uri}' ({str(e).splitlines()[0][:120]})",
            "check the URI with `tuneline history` or the MLflow UI",
        ) from None


class Folder:
    """A folder tuneline trained (models/merged, `tuneline export`'s), which holds its run's
    params (TRAINED_PARAMS): it answers as the version registered from it does, through the
    same `Answerer` and settings, with the three parts of a pyfunc model `predict` uses."""

    def __init__(self, answerer) -> None:
        from types import SimpleNamespace

        self.answerer, self.metadata = answerer, SimpleNamespace(flavors={})

    @classmethod
    def of(cls, path: str) -> Folder | None:
        """The folder's model, or None when it holds no params this tuneline reads."""
        from tuneline.modeling import TRAINED_PARAMS
        from tuneline.params_file import parse_params
        from tuneline.serving import Answerer, settings, trained_params

        try:
            raw = trained_params(path)
            params = parse_params(raw, f"{path}/{TRAINED_PARAMS}") if raw is not None else None
        except (OSError, ValueError, TunelineError):  # unreadable, or another tuneline's schema
            return None
        return None if params is None else cls(Answerer().load(path, settings(params)))

    def unwrap_python_model(self):
        return self.answerer

    def predict(self, texts: list[str], params: dict | None = None) -> list[str]:
        return self.answerer.predict(None, texts, params)


CHUNK = 256  # inputs per request to the model (it batches them): answers are printed as each ends


def inputs(texts: list[str], stdin, example: str = "") -> list[str]:
    """The inputs to answer: the command's arguments, where '-' stands for stdin's lines
    (one input per line; blank lines at its end are not inputs). An empty one is refused,
    naming which (and showing `example`, the task's served example, where the model's task
    is known before it loads)."""
    found: list[tuple[str, str]] = []  # (where it came from, the input)
    for i, text in enumerate(texts, 1):
        if text == "-":
            lines = [line.rstrip("\r\n") for line in stdin]
            if lines:  # a file saved with a byte-order mark (Windows Notepad): not part of the first input
                lines[0] = lines[0].removeprefix("\ufeff")
            while lines and not lines[-1].strip():  # blank lines at the end (an editor's): no input, and no
                lines.pop()  # answer's line moves; one between two inputs is still refused below
            found += [(f"line {n} of stdin", line) for n, line in enumerate(lines, 1)]
        else:
            found.append((f"input {i}" if len(texts) > 1 else "the input", text))
    if not found:
        raise TunelineError(
            "stdin had no lines but blank ones, so there is nothing to answer", "give one input per line"
        )
    for where, text in found:
        if not text.strip():
            raise TunelineError(
                f"{where} is empty, so there is nothing to answer",
                f"give the text, e.g. tuneline predict {shlex.quote(example)}"
                if example
                else "give the text to answer",
            )
    return [text for _, text in found]


def interrupted(answered: int, total: int) -> str:
    """What Ctrl-C during `tuneline predict` says: how many answers were printed (in order),
    and how to answer only the rest."""
    if not answered:
        return "interrupted before the first answer. Fix: run the same command again"
    return (
        f"interrupted after {answered} of {total} answers (printed, in the order of the inputs). "
        f"Fix: answer the rest by leaving out the first {answered} inputs, e.g. "
        f"`tail -n +{answered + 1} inputs.txt | tuneline predict -`"
    )


def check(loaded, texts: list[str], constrain: str | None = None) -> None:
    """Refuse, before any is answered, `--labels` for a model without labels, and an input
    the model has no room to answer (one line naming which of them); a model not logged by
    tuneline checks its own."""
    from mlflow.exceptions import MlflowException

    from tuneline import tasks
    from tuneline.serving import Answerer

    try:
        model = loaded.unwrap_python_model()
    except MlflowException:  # not a python model (a legacy or foreign flavour)
        return
    if isinstance(model, Answerer):
        task = tasks.TASKS[model.config["task"]]
        if constrain == "labels" and not (task.labelled and model.config["labels"]):
            raise TunelineError(
                f"--labels picks one of a classifier's labels, and this model is for the {task.name} task",
                "leave out --labels",
            )
        model.prompts(list(texts))
        if (constrain or model.config["constrain"]) == "words":
            model.fits_words(list(texts))


def stream(loaded, texts: list[str], constrain: str | None = None, beams: int | None = None):
    """Every input checked, then answered in requests of CHUNK: yields each answer as its
    request ends (one line each when there are several: a line break is written \\n), and
    says how far it got on stderr past one request."""
    import sys

    check(loaded, texts, constrain)
    for start in range(0, len(texts), CHUNK):
        for answer in answers(loaded, texts[start : start + CHUNK], constrain, beams):
            yield answer.replace("\n", "\\n") if len(texts) > 1 else answer
        if len(texts) > CHUNK:
            print(f"[predict] {min(start + CHUNK, len(texts))}/{len(texts)} inputs answered", file=sys.stderr)


def answers(loaded, texts: list[str], constrain: str | None = None, beams: int | None = None) -> list[str]:
    """The model's answers to `texts`, in one request (the model batches them): under
    `constrain` when given ('none': freely; 'words', 'labels': tuneline/serving.py), by beam
    search over `beams` beams when given; else as the version's evaluate decoded."""
    if "transformers" in loaded.metadata.flavors:  # a legacy version takes no params
        if beams is not None or constrain == "labels":
            raise TunelineError(
                "this version was registered by an older tuneline (MLflow's transformers flavour), "
                "which takes no decoding options",
                "drop --beams and --labels, or register a new version with `tuneline run`",
            )
        params = None
    else:
        params = ({"constrain": constrain} if constrain else {}) | ({"num_beams": beams} if beams else {})
    out = loaded.predict(list(texts), params=params or None)
    out = out if isinstance(out, list) else [out] if isinstance(out, str) else list(out)
    return [str(a).strip() for a in out]
