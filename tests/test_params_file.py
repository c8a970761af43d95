import pytest

from tuneline.errors import TunelineError
from tuneline.params_file import load_params, parse_params


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(TunelineError, match=r"unknown key 'train.lrr'.*did you mean 'train.lr'"):
        parse_params({"train": {"lrr": 0.1}})


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"train": {"lr": -1}}, "train.lr"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"method": "qlora"}}, "train.method"),
        ({"tokenize": {"max_length": "long"}}, "tokenize.max_length"),
        ({"prepare": {"min_words": 10, "max_words": 5}}, "prepare"),
    ],
)
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(TunelineError) as e:
        parse_params(raw)
    assert f"'{key}" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "raw, says",
    [
        (
            {"train": {"lr": -1}},
            "'train.lr' must be a finite number > 0 and <= 1.0 (got -1). Fix: set 'train.lr' to a finite number "
            "> 0 and <= 1.0 (default: 0.002)",
        ),
        ({"tokenize": {"max_length": 99999}}, "'tokenize.max_length' must be an integer >= 16 and <= 8192 (got 99999)"),
        ({"train": {"batch_size": "two"}}, "'train.batch_size' must be an integer >= 1 (got 'two')"),
        (
            {"train": {"method": "lorra"}},
            "'train.method' must be one of 'lora', 'full' (got 'lorra'). Fix: did you mean 'lora'?",
        ),
        ({"prepare": {"task": "clasify"}}, "Fix: did you mean 'classify'?"),
        (
            {"model": {"name": " "}},
            "model.name is empty (in 'model.name'). Fix: name a built-in model (e.g. smollm2-135m-instruct), a local "
            "folder or a hub id",
        ),
        (  # a key that may also be null says so
            {"prepare": {"near_dup_threshold": 0}},
            "'prepare.near_dup_threshold' must be a finite number > 0 and <= 1, or null (got 0)",
        ),
        ({"train": {"grad_checkpointing": "maybe"}}, "'train.grad_checkpointing' must be true or false"),
        # YAML's yes/on are booleans; taken for 1 they would train at rank 1 without a word
        (
            {"train": {"lora_r": True}},
            "'train.lora_r' must be an integer >= 1 (got True, which YAML reads from true/yes/on)",
        ),
        (
            {"prepare": {"near_dup_threshold": False}},
            "'prepare.near_dup_threshold' must be a finite number > 0 and <= 1, or null (got False, which YAML reads "
            "from false/no/off)",
        ),
    ],
)
def test_wrong_types_and_ranges_give_the_key_path_and_what_is_allowed(raw, says):
    with pytest.raises(TunelineError) as e:
        parse_params(raw)
    assert says in str(e.value)


@pytest.mark.parametrize(
    "raw, says",
    [
        # labels on a task that reads none: most likely a forgotten prepare.task, which would
        # train a descrambler on the labelled rows' text without a word
        (
            {"prepare": {"labels": ["neg", "pos"]}},
            "prepare.labels is set, but the descramble task reads no labels (in 'prepare'). Fix: set prepare.task "
            "to classify or entail for labelled data, or prepare.labels=[]",
        ),
        ({"prepare": {"task": "classify", "labels": ["pos"]}}, "Fix: list them in the data's id order"),
        ({"prepare": {"min_words": 9, "max_words": 5}}, "Fix: lower prepare.min_words or raise prepare.max_words"),
        ({"prepare": {"n_test": 0}}, "Fix: set prepare.n_test above 0, or a prepare.test_source"),
        ({"evaluate": {"primary_metric": "accuracy"}}, "Fix: choose one of: chrf, exact_match"),
        ({"register": {"test": "mcnemar"}}, "Fix: use register.test: bootstrap"),
        ({"train": {"method": "full", "quantize": "nf4"}}, "Fix: set train.method: lora, or train.quantize: none"),
        ({"tokenize": {"packing": "concat"}}, "Fix: use 'bfd' for the supervised task 'descramble'"),
    ],
)
def test_a_rule_across_keys_says_its_own_fix(raw, says):
    with pytest.raises(TunelineError) as e:
        parse_params(raw)
    assert says in str(e.value) and str(e.value).count("Fix:") == 1


def test_missing_params_file_says_where_to_run(tmp_path):
    with pytest.raises(TunelineError, match="project root"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "train:\n\tlr: 0.1\n",
            r"params.yaml line 2 \('\\tlr: 0.1'\).*Fix: indent with spaces \(YAML does not allow tabs\)",
        ),
        ("train:\n  lr: '0.1\n  epochs: 1\n", r"""line 2 \("  lr: '0.1"\).*Fix: close the quote opened on line 2"""),
        (
            "prepare:\n  labels: [neg, pos\n",
            r"line 2 \('  labels: \[neg, pos'\).*Fix: close the bracket opened on line 2",
        ),
        ("train:\n  lr: 0.1\n    epochs: 1\n", r"line 3 \('    epochs: 1'\).*line a key up under the other keys"),
    ],
)
def test_a_yaml_mistake_names_its_line_and_the_usual_fix(tmp_path, text, message):
    """A tab in params.yaml said only 'not valid YAML (while scanning for the next token).
    Fix: fix the YAML syntax'."""
    from tuneline.params_file import read_yaml

    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(TunelineError, match=message):
        read_yaml(tmp_path / "params.yaml", "params.yaml")
