"""Every shipped recipe loads through the schema; --set is data; params.yaml is the default recipe."""

from pathlib import Path

import pytest
import yaml

from tuneline import recipes
from tuneline.config import Params, flatten
from tuneline.errors import TunelineError
from tuneline.params_file import load_params, parse_params
from tuneline.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["alpaca", "chat", "descramble", "emotion", "mnli", "pretrain"]


def test_the_six_recipes_ship():
    assert recipes.names() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_recipe_and_its_smoke_variant_validate(name):
    full, smoke = recipes.build(name), recipes.build(name, smoke=True)
    assert full.register.experiment == "tuneline" and not full.register.dry_run
    # smoke: a tiny slice, its own experiment, nothing registered
    assert smoke.register.experiment == "smoke" and smoke.register.dry_run
    assert smoke.train.max_steps <= 3 and smoke.prepare.n_test <= 16
    assert full.prepare.task == smoke.prepare.task and full.model.name == smoke.model.name
    assert full.primary_metric() in TASKS[full.prepare.task].metrics


@pytest.mark.parametrize("name", SHIPPED)
def test_every_recipe_says_what_it_does_in_one_whole_sentence(name):
    # `tuneline recipes` lists it: a first line cut mid-sentence read "... target:"
    text = recipes.summary(name)
    assert text.endswith(".") and text.count("`") % 2 == 0, text
    assert 20 <= len(text) <= 200, text
    first = (REPO / "recipes" / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith("# ") and text.startswith(first[2:].split(".")[0])


def test_a_summary_ends_at_the_first_sentence_not_at_a_dot_inside_a_word(tmp_path, monkeypatch):
    (tmp_path / "x.yaml").write_text(
        "# Reads notes.txt (v2.5 rules), e.g. 3.\n# More. Even more.\n#\n# Later.\nseed: 1\n"
    )
    monkeypatch.setattr(recipes, "recipes_dir", lambda: tmp_path)
    assert recipes.summary("x") == "Reads notes.txt (v2.5 rules), e.g. 3."


def test_params_yaml_is_the_descramble_recipe_and_the_schema_defaults():
    # Defaults exist once, in the schema: the default job, params.yaml and Params() agree.
    assert load_params(REPO / "params.yaml") == recipes.build("descramble") == Params()


def test_dump_round_trips_and_documents_every_key():
    p = recipes.build("emotion", ["train.lr=0.0005"])
    text = recipes.dump(p, "header")
    assert parse_params(yaml.safe_load(text)) == p
    assert text.count("\n  # ") + text.count("\n# Seeds") >= len(flatten(p))  # a comment per key


def test_set_values_are_yaml_data_never_code():
    got = recipes.parse_set(
        [
            "train.lr=0.001",
            "prepare.labels=[a, b]",
            "model.name=__import__('os').system('x')",
            "prepare.columns.text=sentence",
        ]
    )
    assert got == {
        "train": {"lr": 1e-3},
        "prepare": {"labels": ["a", "b"], "columns": {"text": "sentence"}},
        "model": {"name": "__import__('os').system('x')"},
    }
    assert recipes.build("pretrain", ["prepare.source='hf:'"]).prepare.source == "hf:"  # as the fix below says
    assert recipes.build("emotion", ["train.lr=1e-3"]).train.lr == 0.001  # YAML reads 1e-3 as text; the schema converts
    assert recipes.build("emotion", ["prepare.labels=[1,2,3]"]).prepare.labels == ["1", "2", "3"]  # ratings
    p = recipes.build("emotion", ["prepare.columns.text=sentence"])
    assert p.prepare.columns == {"text": "sentence"} and p.prepare.labels  # merged into the recipe, not replacing it


@pytest.mark.parametrize(
    "args, message",
    [
        (("emotoin", []), r"unknown recipe 'emotoin'.*did you mean 'emotion'"),
        (("emotion", ["train.lrr=1"]), r"unknown key 'train.lrr'.*did you mean 'train.lr'"),
        (("emotion", ["train.lr"]), r"--set 'train.lr' is not key=value"),
        (("emotion", ["evaluate.primary_metric=bleu"]), r"'bleu' is not a metric of the classify task.*accuracy"),
        (("descramble", ["tokenize.packing=concat"]), r"use 'bfd' for the supervised task"),
        (("emotion", ["prepare.labels=[joy]"]), r"needs at least two labels"),
        # an answer or an id that could be either label
        (("emotion", ["prepare.labels=[joy,sad,joy]"]), r"prepare.labels lists 'joy' twice.*list each label once"),
        (("emotion", ["prepare.labels=[Joy,joy]"]), r"prepare.labels lists 'Joy' and 'joy'"),
        (("emotion", ["prepare.labels=[joy,'']"]), r"prepare.labels holds an empty label"),
        # yes/no labels (BoolQ-style): YAML 1.1 reads them as booleans, their spelling lost
        (("emotion", ["prepare.labels=[yes,no]"]), r"holds \[True, False\]: YAML reads yes/no.*quote them"),
        # a key the task does not read would be ignored, and the column meant reported missing
        (
            ("descramble", ["prepare.columns.text=sentence"]),
            r"columns maps 'text', which the descramble task does not read \(its columns: source, target\)",
        ),
        # a comma list without brackets is one string to YAML: the fix writes it the way that works
        (("emotion", ["prepare.labels=neg,pos"]), r"'prepare.labels' must be a list .*e.g. prepare.labels=\[neg,pos\]"),
        # the same key twice: the last value won unsaid
        (
            ("emotion", ["train.lr=0.1", "train.epochs=2", "train.lr=0.2"]),
            r"--set gives 'train.lr' twice \('0.1', then '0.2'\)",
        ),
        # a bracket left open: the fix closed it around the open one ("[[neg,pos]")
        (
            ("emotion", ["prepare.labels=[neg,pos"]),
            r"must be a list \(got '\[neg,pos', whose brackets do not pair up\).*e.g. prepare.labels=\[neg,pos\] with",
        ),
        # YAML reads `hf:` as the mapping {hf: None}: the fix quotes it, which works
        (
            ("pretrain", ["prepare.source=hf:"]),
            r"'prepare.source' must be text \(got \{'hf': None\}\).*Fix: quote the value, e.g. --set \"prepare.source='...'\"",
        ),
        (
            ("emotion", ["prepare.columns=review"]),
            r"'prepare.columns' must be a mapping .*prepare.columns.<key>=<value>",
        ),
    ],
)
def test_bad_recipe_input_is_one_clear_line(args, message):
    with pytest.raises(TunelineError, match=message) as e:
        recipes.build(*args)
    assert "\n" not in str(e.value)
