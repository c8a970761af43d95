"""`tuneline export` (tuneline/export.py): a registered version as a Hugging Face folder
that transformers alone loads and answers with as tuneline does."""

import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from tuneline import constrain, export, request, tasks
from tuneline.errors import TunelineError
from tuneline.generation import generate
from tuneline.modeling import load_tokenizer, resolve

CARD = "# d v1\n\n**Task** descramble\n\n## Gate decision\n\npromoted"


@pytest.fixture(scope="module")
def version(logged):
    """The logged tiny descrambler registered as 'd' v1, with a model card."""
    uri, params, root = logged
    client = mlflow.MlflowClient()
    v = mlflow.register_model(uri, "d")
    client.update_model_version("d", v.version, description=CARD)
    return client, client.get_model_version("d", v.version), params


def _readme_code(folder) -> str:
    return re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)


def test_an_exported_version_answers_with_transformers_alone_as_tuneline_does(version, tiny_gpt2, tmp_path):
    """The default job's descrambler: the README example keeps the answer to the input's
    words, with tuneline's constraint shipped as transformers' custom_generate."""
    _, v, params = version
    dest = tmp_path / "out"
    dest.mkdir()  # an empty folder is fine
    done = export.export(v, dest)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(done["files"])
    # Readable by whoever may read the rest (a container's user, a model server): the weights
    # were 0600 as safetensors wrote them and MLflow copied them.
    assert (dest / "model.safetensors").stat().st_mode & 0o777 == (dest / "config.json").stat().st_mode & 0o777
    gen = json.loads((dest / "generation_config.json").read_text())
    assert (gen["max_new_tokens"], gen["num_beams"], gen["do_sample"], gen["eos_token_id"]) == (24, 1, False, 50256)
    readme = (dest / "README.md").read_text()
    meta = yaml.safe_load(readme.split("---\n")[1])
    assert meta["library_name"] == "transformers" and "base_model" not in meta
    assert {"descramble", "custom_generate"} <= set(meta["tags"])
    assert readme.count("# d v1") == 1 and "## Gate decision" in readme  # the card, under one title
    # The README's example, in a fresh interpreter that never imports tuneline
    code = _readme_code(dest)
    assert "import tuneline" not in code and "from tuneline" not in code
    shipped = dest / "custom_generate" / "generate.py"
    assert shipped.read_text() == Path(constrain.__file__).read_text()  # tuneline's constraint, as it is
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # ... answers as tuneline decodes the registered model under its constraint (fp32), and as
    # export checked: the input's words, each as often as there (the random tiny model alone
    # would not keep them).
    task, tok = tasks.TASKS["descramble"], load_tokenizer("tiny-gpt2")
    prompt = task.prompt({"source": task.serve_example, "target": ""}, [])
    words = constrain.WordConstraint(tok, [task.serve_example])
    ours = generate(tiny_gpt2, tok, [prompt], 24, 1, 1, task.stop, constraint=words, show=False)[0]
    assert proc.stdout.rstrip("\n").splitlines()[-1] == ours == done["answer"]
    assert sorted(ours.split()) == sorted(task.serve_example.split())
    free = generate(tiny_gpt2, tok, [prompt], 24, 1, 1, task.stop, show=False)[0]
    assert sorted(free.split()) != sorted(ours.split())


def test_every_task_answers_with_transformers_alone_as_tuneline_does(model_cache, tmp_path):
    """Each task's example (its prompt, chat template, cut; the word constraint where the
    task has one) against tuneline's decoding at 2 beams; a chat model that trained on
    tuneline's default template gets it saved with the folder."""
    folder = tmp_path / "hf"
    shutil.copytree(resolve("tiny-gpt2"), folder)  # built into model_cache's folder if no test built it yet
    tok = load_tokenizer(str(folder))
    chat_seen = constrained_seen = False
    for name, task in tasks.TASKS.items():
        chat_seen |= task.chat
        labels = {"classify": ["joy", "anger"], "entail": ["entailment", "neutral", "contradiction"]}.get(name, [])
        for kept in ("none", "words") if task.words else ("none",):
            config = {"task": name, "labels": labels, "max_new_tokens": 12, "num_beams": 2, "constrain": kept}
            config |= {"precision": "auto", "batch_size": 4}
            shutil.rmtree(folder / "custom_generate", ignore_errors=True)
            export._decode_config(folder, config, tok)
            export._chat_template(folder, task, tok)
            export._custom_generate(folder, task, config)
            assert (folder / "chat_template.jinja").is_file() == chat_seen  # written by the chat task only
            assert (folder / "custom_generate").is_dir() == (kept == "words")
            said = export.check(folder, task, config, export.example(task, config, str(folder)), tok)
            if kept == "words":
                constrained_seen = True
                assert sorted(said.split()) == sorted(task.serve_example.split())
    assert chat_seen and constrained_seen and load_tokenizer(str(folder)).chat_template is not None


def test_the_examples_prompt_is_the_served_one_for_every_field_a_request_may_leave_out(monkeypatch):
    """`answer`'s arguments are the fields a served request names (instruct's input may be
    left out, and its Context block goes with it), and its prompt is the one tuneline
    serves for them, for each shipped task and a task of one's own with two optional fields."""
    own = tasks.Task(
        "own",
        ("question", "context", "hint", "answer"),
        ("context", "hint"),
        ("question",),
        prompt=lambda r, _: (
            f"Q: {r['question']} {{braces}}\n"
            + (f"C: {r['context']}\n" if r["context"] else "")
            + (f"H: {r['hint']}\n" if r["hint"] else "")
            + "A:"
        ),
        answer=lambda r: r["answer"],
        metrics=("perplexity",),
        serve_fields=("question", "context", "hint"),
    )
    monkeypatch.setitem(tasks.TASKS, "own", own)
    seen = 0
    for name, task in tasks.TASKS.items():
        if task.chat:
            continue  # a chat template renders it (checked against tuneline's in the test above)
        labels = {"classify": ["joy", "anger"], "entail": ["entailment", "neutral", "contradiction"]}.get(name, [])
        code = export.example(task, {"labels": labels, "constrain": "none"}, "m").split("\n\n\n")[1]
        head, body = code.split("\n", 1)
        scope: dict = {}
        exec(head + "\n" + body.split("    ids = ")[0] + "    return prompt\n", scope)  # noqa: S102
        fields = export.fields(task)
        optional = export.optional(task)
        for k in range(len(optional) + 1):
            for left in itertools.combinations(optional, k):
                asked = {f: f"<{f}>" for f in fields if f not in left}
                served = request.prompt(task, asked if task.serve_fields else asked["text"], labels)
                assert scope["answer"](**asked) == served, (name, asked)
                seen += 1
    assert seen >= 9


def test_an_example_that_answers_otherwise_is_refused_and_nothing_is_written(version, tmp_path, monkeypatch):
    _, v, _ = version
    right = export.example
    monkeypatch.setattr(export, "example", lambda *a: right(*a).replace("'Unscramble: ", "'Sort: "))
    dest = tmp_path / "out"
    with pytest.raises(
        TunelineError,
        match=r"run with plain transformers, answers '.*' to answer\('cat the on sat mat the'\) where tuneline answers",
    ):
        export.export(v, dest)
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary one


def test_a_destination_must_be_new_or_empty_and_pushing_needs_the_hub(tmp_path, monkeypatch):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for bad, says in [
        (tmp_path / "full", "is not an empty folder"),
        (tmp_path / "full" / "x", "is a file, and the export is a folder"),
        (tmp_path / "no" / "out", "does not exist"),
        (Path("/proc/hf"), "no folder can be made in '/proc'"),  # found only after the export, before
    ]:
        with pytest.raises(TunelineError, match=says):
            export.check_dest(bad)
    export.check_dest(tmp_path / "new")
    for bad in ("bad repo name", "me/d/x"):  # refused before any work, not after the export
        with pytest.raises(TunelineError, match=f"--hub '{bad}' is not a hub repository id.*e.g. --hub me/"):
            export.check_hub(bad)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    export.check_hub("me/descrambler")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TunelineError, match="hub is off"):
        export.check_hub("me/descrambler")


def test_push_sends_the_folder_in_one_commit_to_a_private_repo_whose_example_loads_from_it(tmp_path, monkeypatch):
    import httpx
    import huggingface_hub

    calls = []

    class Api:  # the hub's calls, recorded (no network here)
        def create_repo(self, repo, **kw):
            calls.append(("create", repo, kw))

        def create_commit(self, repo, ops, **kw):
            calls.append(("commit", repo, ops, kw))
            if repo == "me/denied":
                denied = httpx.Response(403, request=httpx.Request("POST", "https://huggingface.co/api/me/denied"))
                raise huggingface_hub.errors.HfHubHTTPError("403 Forbidden: no write access", response=denied)
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo}/commit/abc"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    folder = tmp_path / "out"
    folder.mkdir()
    readme = f"MODEL = {str(folder)!r}\ntok = AutoTokenizer.from_pretrained(MODEL)\n"
    (folder / "README.md").write_text(readme)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "custom_generate").mkdir()
    (folder / "custom_generate" / "generate.py").write_text("def generate(model, **kw): ...\n")
    v = type("V", (), {"name": "d", "version": "3", "run_id": "r1"})()
    assert export.push(folder, "me/d", v) == "https://huggingface.co/me/d/commit/abc"
    assert calls[0] == ("create", "me/d", {"private": True, "exist_ok": True})
    _, repo, ops, kw = calls[1]
    sent = {op.path_in_repo: op.path_or_fileobj for op in ops}
    assert sent["README.md"] == readme.replace(repr(str(folder)), "'me/d'").encode()
    assert sent["model.safetensors"] == str(folder / "model.safetensors") and "d v3" in kw["commit_message"]
    assert sent["custom_generate/generate.py"] == str(folder / "custom_generate" / "generate.py")  # subfolders too
    assert (folder / "README.md").read_text() == readme  # the local folder still loads from itself
    with pytest.raises(
        TunelineError, match=r"upload to the hub repository 'me/denied' failed.*403.*hf upload me/denied"
    ):
        export.push(folder, "me/denied", v)


def test_a_version_from_mlflows_transformers_flavour_is_refused_in_one_line(tmp_path):
    """Versions registered by older tuneline have no merged folder of ours to take out."""
    flavors = {"transformers": {"task": "text-generation"}, "python_function": {"loader_module": "mlflow.transformers"}}
    (tmp_path / "MLmodel").write_text(yaml.safe_dump({"flavors": flavors}))
    with pytest.raises(TunelineError, match="d v1 was not registered by this tuneline.*mlflow.pyfunc.load_model"):
        export._served(tmp_path, "d v1")
