"""`tuneline predict`'s inputs: arguments, or stdin's lines for '-'."""

from __future__ import annotations

import io

import pytest

from tuneline.errors import TunelineError
from tuneline.predict import inputs


def test_dash_reads_one_input_per_line_from_stdin_in_order():
    stdin = io.StringIO("sat cat the\r\nran dog the\n")
    assert inputs(["first one", "-", "last"], stdin) == ["first one", "sat cat the", "ran dog the", "last"]
    assert inputs(["only"], io.StringIO("unread\n")) == ["only"]
    # A file saved with a byte-order mark: the first input was '\ufeffsat', and a descrambler wrote it back
    assert inputs(["-"], io.StringIO("\ufeffsat cat the\r\nran dog the\r\n")) == ["sat cat the", "ran dog the"]
    # Blank lines an editor leaves at the end are not inputs ("line 3 of stdin is empty"); one
    # between two inputs is still refused (below): skipping it would shift every later answer.
    assert inputs(["-", "last"], io.StringIO("sat cat the\n\n \r\n")) == ["sat cat the", "last"]


@pytest.mark.parametrize(
    ("texts", "stdin", "says"),
    [
        ([" "], "", "the input is empty"),
        (["a b", ""], "", "input 2 is empty"),
        (["-"], "a b\n\nc d\n", "line 2 of stdin is empty"),
        (["-"], "", "stdin had no lines but blank ones"),
        (["-"], "\n\n", "stdin had no lines but blank ones"),
    ],
)
def test_an_empty_input_is_refused_naming_which(texts, stdin, says):
    with pytest.raises(TunelineError, match=says):
        inputs(texts, io.StringIO(stdin))


def test_an_empty_inputs_fix_shows_the_models_task_example_where_it_is_known():
    """A pretrained model's user is not told to send scrambled words (the fix named a
    descrambler's input whatever the task was)."""
    with pytest.raises(TunelineError, match=r"Fix: give the text, e\.g\. tuneline predict 'The history of the city'$"):
        inputs([" "], io.StringIO(), "The history of the city")
    with pytest.raises(TunelineError, match=r"Fix: give the text to answer$"):  # --model: not known before it loads
        inputs([" "], io.StringIO())


def test_a_model_that_is_neither_a_uri_nor_a_folder_is_named_as_such(tmp_path, monkeypatch):
    from tuneline.predict import load

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TunelineError) as e:
        load("champion-model")
    assert str(e.value).startswith(
        f"--model 'champion-model' is not a model URI, and no folder '{tmp_path}/champion-model' exists. Fix: give models:/"
    )
    with pytest.raises(TunelineError, match="^--model is empty. Fix: give models:/"):  # not "no folder '<cwd>'"
        load("")


def test_a_hugging_face_folder_is_named_as_such_with_the_command_that_takes_it(tmp_path):
    from tuneline.predict import load

    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")  # what models/merged and `tuneline export` write
    with pytest.raises(
        TunelineError, match=r"is a Hugging Face model folder, not an MLflow model.*tuneline evaluate --model"
    ):
        load(str(tmp_path / "merged"))


def test_a_folder_tuneline_trained_answers_as_the_version_registered_from_it(tmp_path, logged):
    """models/merged and `tuneline export`'s folder hold their run's params: `tuneline predict
    --model ./exported` said it "holds no task, prompt or decoding to answer with"."""
    import json
    import shutil

    import mlflow

    from tuneline import predict as pred
    from tuneline.modeling import TRAINED_PARAMS

    uri, params, root = logged  # tiny-gpt2 registered as a descrambler from root/merged
    folder = tmp_path / "exported"
    shutil.copytree(root / "merged", folder)
    (folder / TRAINED_PARAMS).write_text(json.dumps(params.model_dump()))
    texts = ["sat cat the mat on the", "went I home", "the was founded university in 1908."]
    registered = mlflow.pyfunc.load_model(uri)
    for constrain in (None, "none"):  # kept to the input's words, as the version; and freely
        assert list(pred.stream(pred.load(str(folder)), texts, constrain)) == list(
            pred.stream(registered, texts, constrain)
        )
    (folder / TRAINED_PARAMS).write_text(json.dumps({"train": {"lrr": 1}}))  # another tuneline's params
    with pytest.raises(TunelineError, match="is a Hugging Face model folder"):
        pred.load(str(folder))


def test_labels_are_scored_not_decoded_so_decoding_options_are_refused():
    from typer.testing import CliRunner

    from tuneline.cli import app

    for extra in (["--free"], ["--beams", "2"]):
        result = CliRunner().invoke(app, ["predict", "--labels", *extra, "i feel great"])
        assert result.exit_code == 2, result.output
        assert (
            result.output.strip()
            == "error: --labels scores the labels; it does not decode. Fix: drop --free and --beams"
        )


def test_ctrl_c_says_how_many_answers_were_printed_and_how_to_answer_the_rest(monkeypatch, client):
    """Answers are printed as each request ends: stopped halfway through a long file, the
    user learns where to pick up instead of a silent exit."""
    from typer.testing import CliRunner

    from tuneline import predict
    from tuneline.cli import app

    def stream(loaded, texts, constrain, beams):
        yield from ("one", "two")
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "load", lambda uri: None)
    monkeypatch.setattr(predict, "stream", stream)
    result = CliRunner().invoke(app, ["predict", "--model", "runs:/x/model", "-"], input="a\nb\nc\nd\n")
    assert result.exit_code == 130
    assert result.output.splitlines()[:2] == ["one", "two"]
    assert "error: interrupted after 2 of 4 answers" in result.output and "tail -n +3 inputs.txt" in result.output


def test_labels_for_a_model_that_has_none_is_refused_in_the_commands_words():
    """A chat or descramble model asked for --labels said "constrain 'labels' does not apply
    ... Fix: ask for 'none'", the served param's words rather than the option's."""
    from types import SimpleNamespace

    from tuneline import predict as pred
    from tuneline.serving import Answerer

    served = Answerer()
    served.prompts = lambda texts: texts  # (no model needed: the options are checked first)
    loaded = SimpleNamespace(unwrap_python_model=lambda: served)
    for task, labels in (("chat", []), ("descramble", []), ("classify", [])):
        served.config = {"task": task, "labels": labels}
        with pytest.raises(
            TunelineError, match=rf"^--labels picks one of a classifier's labels, and this model is for the {task} task"
        ):
            pred.check(loaded, ["hi"], "labels")
    served.config = {"task": "classify", "labels": ["joy", "anger"]}
    pred.check(loaded, ["hi"], "labels")  # a classifier's labels: accepted
    served.config = {"task": "chat", "labels": []}
    pred.check(loaded, ["hi"], "none")


def test_name_answers_with_that_registered_models_champion(monkeypatch, client, tmp_path):
    """`--name` picks the registered model, as in history, promote, diff and export; predict
    had no such option and answered only with params.yaml's model."""
    from typer.testing import CliRunner

    from tuneline import predict, registry
    from tuneline.cli import app

    monkeypatch.chdir(tmp_path)  # no project here: --name needs no params.yaml
    client.create_model_version("m", source="file:///nowhere")
    registry.move_champion(client, "m", "1", "gate", "won")
    loaded = []
    monkeypatch.setattr(predict, "load", loaded.append)
    monkeypatch.setattr(predict, "stream", lambda model, texts, constrain, beams: (t.upper() for t in texts))
    result = CliRunner().invoke(app, ["predict", "--name", "m", "sat cat the"])
    assert result.exit_code == 0 and result.output == "SAT CAT THE\n" and loaded == ["models:/m@champion"]
    result = CliRunner().invoke(app, ["predict", "--name", "n", "sat cat the"])
    assert (
        result.exit_code == 2
        and "no registered model 'n'. Fix: ask for one of the registered models: --name m" in result.output
    )
    result = CliRunner().invoke(app, ["predict", "--name", "m", "--model", "runs:/x/model", "sat cat the"])
    assert result.exit_code == 2 and "--model and --name both say which model answers" in result.output
