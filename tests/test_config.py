from pathlib import Path

import yaml

from tuneline.config import Params, flatten
from tuneline.params_file import load_params

REPO = Path(__file__).resolve().parents[1]


def test_shipped_params_load_and_spell_out_every_key():
    params = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    # Every field is written in params.yaml, so no default can change behind DVC's back.
    written = {
        f"{g}.{k}" if isinstance(v, dict) else g for g, v in raw.items() for k in (v if isinstance(v, dict) else [g])
    }
    assert written == set(flatten(params)) == set(flatten(Params()))


def test_yes_and_on_still_set_a_boolean_key():
    from tuneline import recipes

    params = recipes.build(None, ["train.grad_checkpointing=yes", "prepare.hub_streaming=on"])
    assert params.train.grad_checkpointing is True and params.prepare.hub_streaming is True
