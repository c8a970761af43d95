import json
import re

import pytest

from tuneline.errors import TunelineError
from tuneline.modeling import load_model, load_tokenizer, resolve


def test_tiny_gpt2_is_built_once_with_the_real_tokenizer(model_cache):
    path = resolve("tiny-gpt2")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert resolve("tiny-gpt2") == path
    tok = load_tokenizer("tiny-gpt2")
    assert tok("Hello world")["input_ids"] == [15496, 995]


def test_tiny_gpt2_is_the_same_model_everywhere(tiny_gpt2):
    # seeded init: a golden value guards against silent changes to the test model
    assert tiny_gpt2.num_parameters() == 3_382_080
    assert float(tiny_gpt2.transformer.wte.weight[15496, :4].detach().sum()) == pytest.approx(-0.0040244, abs=1e-6)


def test_unknown_hub_model_offline_fails_fast_with_a_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TunelineError, match="cannot load model 'nobody/no-such-model'.*built-in model"):
        load_tokenizer("nobody/no-such-model")


@pytest.mark.parametrize(
    "name, says",
    [
        ("smollm2-135m", "did you mean the built-in 'smollm2-135m-instruct'?"),
        ("tiny-gpt", "did you mean the built-in 'tiny-gpt2'?"),
        ("gpt2", None),
    ],
)
def test_a_name_near_one_built_in_model_offline_names_it(name, says, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TunelineError, match=f"cannot load model '{name}'") as e:
        load_tokenizer(name)
    if says:
        assert says in str(e.value)
    else:  # 'gpt2' starts three built-ins' names: it is the hub's gpt2 the user means
        assert "did you mean" not in str(e.value)


@pytest.mark.parametrize("name", ["./my-model", "../models/merged", "/nowhere/model", "runs/3/merged"])
def test_a_missing_model_folder_is_named_as_a_folder_not_a_hub_id(name, tmp_path, monkeypatch):
    """A path that cannot be a hub id ('org/name' at most) is a folder the user meant: the
    line says where it looked, not that the hub is off."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TunelineError, match=rf"model folder '{re.escape(name)}' not found \(looked for /") as e:
        load_tokenizer(name)
    assert "HF_HUB_OFFLINE" not in str(e.value)


def test_corrupt_weights_are_named(tmp_path, model_cache):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(resolve("tiny-gpt2"), bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TunelineError, match="could not be read"):
        load_model(str(bad))


def test_a_model_folder_saved_without_its_tokenizer_is_named_as_such(tmp_path, model_cache):
    """model.save_pretrained alone: transformers then makes an empty GPT-2 tokenizer (one
    token), which the end-of-text check used to call "not the model's tokenizer"."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(resolve("tiny-gpt2"), bare, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*"))
    with pytest.raises(TunelineError, match=r"holds no tokenizer .* Fix: save the tokenizer with the model"):
        load_tokenizer(str(bare))


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(TunelineError, match="no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(TunelineError) as err:  # loading it (tuneline evaluate -m FOLDER): the same one line
        load_model(str(tmp_path))
    assert str(err.value).startswith(f"model directory '{tmp_path}' has no config.json"), str(err.value)
    assert str(err.value).count("Fix:") == 1


def test_the_built_in_smollm2_answers_like_smollm2(model_cache):
    """The conversion from the GGUF (its metadata read once, the model rebuilt without a
    second random init) keeps the weights, the tokenizer and the chat template: lm_head is
    tied to the embeddings, and greedy decoding answers a plain question."""
    tok, model = load_tokenizer("smollm2-135m-instruct"), load_model("smollm2-135m-instruct")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).startswith("The capital of France is Paris")


def test_a_local_folder_is_known_by_its_files_not_only_its_name(tmp_path, local_model):
    """New weights saved under the same path are another model (a checkpoint, cached base
    scores and the trained model must not be taken for the old one's); the same bytes
    written again are the same model, and built-in names stand for themselves."""
    import os

    from tuneline.modeling import identity

    folder = local_model
    first = identity(str(folder))
    assert first.startswith(f"{folder}@") and identity(str(folder)) == first
    (folder / "model.safetensors").write_bytes(b"new weights")
    changed = identity(str(folder))
    assert changed != first
    (folder / "model.safetensors").write_bytes(b"old weights")  # rewritten: a new mtime, the old bytes
    os.utime(folder / "model.safetensors", ns=(1, 1))
    assert identity(str(folder)) == first
    (folder / "checkpoint-5").mkdir()  # what from_pretrained does not read
    (folder / "checkpoint-5" / "model.safetensors").write_bytes(b"a trainer's checkpoint")
    assert identity(str(folder)) == first
    # Hashes are kept by (path, size, mtime, inode): unchanged files are not read again,
    # and the hashes of replaced files are forgotten.
    kept = json.loads((tmp_path / ".cache" / "file-hashes.json").read_text())
    assert len(kept) == 2 and all(k.startswith(str(folder.resolve())) for k in kept)
    assert identity("tiny-gpt2") == "tiny-gpt2" and identity("nobody/hub-model") == "nobody/hub-model"


def test_a_sweep_arm_finds_a_relative_model_folder_in_the_project_it_was_queued_from(
    tmp_path, local_model, monkeypatch
):
    """An untracked model folder is not in the copy of the project DVC's queue runs an arm
    in: `model.name=my-base` would be taken for a hub id there."""
    from tuneline.modeling import identity, resolve

    monkeypatch.setenv("DVC_EXP_NAME", "sweep-abc123-1")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # local_model is tmp_path/my-base
    assert (
        resolve("my-base") == local_model
        and identity("my-base") == f"my-base@{identity(str(local_model)).split('@')[1]}"
    )


def test_a_sweep_arm_loads_the_model_it_trained_not_the_projects(tmp_path, monkeypatch):
    """validate loads models/merged: in an arm, the one its own train stage just made in its
    copy. Each arm validated the project's models/merged (its last run's) instead, so every
    arm of a sweep scored alike and the winner was picked on nothing."""
    import tuneline
    from tuneline.modeling import resolve

    project = tmp_path / "proj"
    copy = project / ".dvc/tmp/exps/tmp1234"
    for root in (project, copy):
        (root / "models/merged").mkdir(parents=True)
        (root / "models/merged/config.json").write_text("{}")
    monkeypatch.setattr(tuneline, "ROOT", copy)
    monkeypatch.setenv("DVC_EXP_NAME", "sweep-abc123-1")
    monkeypatch.setenv("DVC_ROOT", str(project))
    assert resolve("models/merged") == copy / "models/merged"
    (project / "my-base").mkdir()  # untracked: only in the project
    (project / "my-base/config.json").write_text("{}")
    assert resolve("my-base") == project / "my-base"


def test_a_model_folder_file_it_cannot_read_is_one_line(local_model, monkeypatch):
    import tuneline.io
    from tuneline import modeling

    def unreadable(path, mode="r"):  # what chmod 0 gives a user other than root
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(tuneline.io, "open", unreadable, raising=False)
    with pytest.raises(TunelineError, match=f"model.name '{local_model}': cannot read config.json .Permission denied"):
        modeling.identity(str(local_model))
