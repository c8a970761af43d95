"""Recipes: `recipes/<name>.yaml` files of params overrides, `--set key=value` on top.

The params a run uses are: the schema defaults (tuneline/config.py), then the recipe,
then each `--set`. A recipe may carry a `smoke:` block, applied on top of SMOKE by
`--smoke`. `dump` writes params.yaml with every key and its description as a comment, so
the file DVC tracks is always complete and readable.
"""

from __future__ import annotations

import difflib
import os
import shlex
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from tuneline import ROOT
from tuneline.config import Params, PrepareCfg
from tuneline.errors import TunelineError
from tuneline.params_file import parse_params, read_yaml

# A tiny slice of any recipe: a few dozen rows, a few steps, nothing registered.
SMOKE: dict[str, Any] = {
    "prepare": {"n_train": 48, "n_val": 8, "n_test": 8},
    "train": {"max_steps": 3, "eval_every": 3, "log_every": 1, "batch_size": 1, "epochs": 1.0, "nproc": 1},
    "evaluate": {"max_new_tokens": 24},
    "register": {"experiment": "smoke", "dry_run": True},
}


def recipes_dir() -> Path:
    return ROOT / "recipes"


def names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def for_task(task: str) -> list[str]:
    """The recipes whose prepare.task is `task` (a recipe that sets none has the schema's)."""
    default = PrepareCfg.model_fields["task"].default
    return [n for n in names() if ((load_recipe(n) or {}).get("prepare") or {}).get("task", default) == task]


def summary(name: str) -> str:
    """What recipe `name` does: the first sentence of its header comment (the lines of `#`
    at the top of recipes/<name>.yaml), which may span several lines."""
    import re

    header = []
    for line in (recipes_dir() / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#") or line.strip() == "#":
            break
        header.append(line.lstrip("#").strip())
    text = " ".join(header)
    # A stop then a space or the end, not inside "chat.py)" or "82.5%", nor after "e.g" or "et al"
    for end in re.finditer(r"[.!?](?=\s|$)", text):
        if not re.search(r"(\be\.g|\bi\.e|\bal|\bvs)$", text[: end.start()]):
            return text[: end.end()]
    return text


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def name_of(given: str) -> str:
    """The recipe `--recipe` names: a name, or the path of its file under recipes/ (as a shell
    completes `recipes/emo<TAB>`). A YAML file elsewhere is refused with the copy that makes
    it a recipe: the name is what .smoke/<name>/, the experiment's command line, a
    schedule's deployment and every later run read again from recipes/."""
    if not given.endswith((".yaml", ".yml")) and "/" not in given and os.sep not in given:
        return given
    path = Path(given).expanduser().resolve()  # as typed, from the working directory
    if path.parent == recipes_dir().resolve() and path.suffix == ".yaml":
        return path.stem
    raise TunelineError(
        f"--recipe '{given}' is not a file recipes/<name>.yaml, and a recipe is one of those, run by its name",
        f"copy it there: cp {shlex.quote(given)} {recipes_dir().relative_to(ROOT)}/{path.stem}.yaml, "
        f"then --recipe {path.stem}",
    )


def load_recipe(name: str) -> dict:
    path = recipes_dir() / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, names(), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of: {', '.join(names()) or '(none found)'}"
        raise TunelineError(
            f"unknown recipe '{name}' (no {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path})", hint
        )
    return read_yaml(path, f"recipes/{name}.yaml", allow_empty=True)


def parse_set(items: list[str]) -> dict:
    """`a.b=value` pairs into a nested dict. Values are YAML scalars/lists (data, never code)."""
    out: dict = {}
    given: dict[str, str] = {}  # key -> its value as typed: a key set twice would keep the last unsaid
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise TunelineError(f"--set '{item}' is not key=value", "write e.g. --set train.lr=0.001")
        if key.strip() in given:
            raise TunelineError(
                f"--set gives '{key.strip()}' twice ({given[key.strip()]!r}, then {value!r})", "set each key once"
            )
        given[key.strip()] = value
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value  # not YAML: keep the text as a string
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TunelineError(f"--set '{item}' conflicts with another --set of '{part}'", "set each key once")
        node[parts[-1]] = parsed
    return out


def build(recipe: str | None, sets: list[str] | tuple = (), smoke: bool = False, base: dict | None = None) -> Params:
    """The params of a run, validated. `base` (params.yaml's content) is used without a recipe."""
    raw = dict(base or {})
    source = "params.yaml"
    if recipe:
        over = load_recipe(recipe)
        smoke_over = over.pop("smoke", {}) or {}
        raw, source = over, f"recipes/{recipe}.yaml"
    else:
        smoke_over = {}
        raw.pop("smoke", None)
    if smoke:
        raw = merge(merge(raw, SMOKE), smoke_over)
    if sets:
        raw, source = merge(raw, parse_set(list(sets))), f"{source} with --set"
    return parse_params(raw, source)


def dump(params: Params, header: str) -> str:
    """params.yaml text: every key, grouped by stage, each with its description."""
    lines = [f"# {line}" for line in header.splitlines()] + [
        "# Every key is validated before any work starts; DVC re-runs only the stages whose keys change.",
        "",
    ]
    for name, field in type(params).model_fields.items():
        value = getattr(params, name)
        if isinstance(value, BaseModel):
            lines.append(f"{name}:")
            for key, sub in type(value).model_fields.items():
                lines.append(f"  # {sub.description}")
                lines.append(f"  {key}: {_scalar(getattr(value, key))}")
            lines.append("")
        else:
            lines += [f"# {field.description}", f"{name}: {_scalar(value)}", ""]
    return "\n".join(lines)


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
