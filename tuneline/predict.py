"""`tuneline predict`: one answer from a model in the MLflow registry (or any MLflow model URI).

A registered model answers as the run's evaluate scored (tuneline/serving.py): the task's
prompt filled with the input, decoded greedily or by beam search, a descrambler under the
word constraint (the input's words, each used once, in the model's order). `--free` asks it
to decode freely. Versions registered by older tuneline (MLflow's transformers flavour)
answer freely either way.
"""

from __future__ import annotations

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


def answer(loaded, text: str, free: bool = False, beams: int | None = None) -> str:
    """The model's answer to `text` (decoded freely with `free`, by beam search over `beams`
    beams when given; else as the version's evaluate decoded)."""
    if "transformers" in loaded.metadata.flavors:  # a legacy version takes no params
        if beams is not None:
            raise TunelineError(
                "this version was registered by an older tuneline (MLflow's transformers flavour), "
                "which takes no decoding options",
                "drop --beams, or register a new version with `tuneline run`",
            )
        params = None
    else:
        params = ({"constrain": "none"} if free else {}) | ({"num_beams": beams} if beams else {})
    out = loaded.predict([text], params=params or None)
    return str(out[0] if isinstance(out, list) else out).strip()
