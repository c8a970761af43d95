"""Reading a params file: the YAML as written (one line for a syntax mistake, a key given
twice, a file that is not UTF-8), validated into `Params` with each schema error explained
as the key path, what it accepts, and the fix. The schema itself is `tuneline.config`."""

from __future__ import annotations

import difflib
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from tuneline import io
from tuneline.config import PARAMS_FILE, Params
from tuneline.errors import TunelineError
from tuneline.tasks import TASKS


def _field(loc: tuple):
    """The schema field at a key path, e.g. ('train', 'lr'), or None."""
    model, field = Params, None
    for part in loc:
        field = model.model_fields.get(str(part)) if model else None
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return field


def _known_keys(loc: tuple) -> list[str]:
    parent = _field(loc[:-1]) if loc[:-1] else None
    model = parent.annotation if parent is not None else Params
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _choices(field) -> tuple:
    """The values a field accepts, if it is a choice: a Literal's, or the registered tasks."""
    if get_origin(field.annotation) is Literal:
        return get_args(field.annotation)
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return tuple(TASKS) if extra.get("choices") == "tasks" else ()


def _allowed(field) -> str | None:
    """What a field accepts, in words: 'one of ...' or a range such as '> 0 and <= 1'."""
    choices = _choices(field)
    if choices:
        return "one of " + ", ".join(repr(c) for c in choices)
    ann = field.annotation
    kinds = set(get_args(ann)) if get_origin(ann) in (Union, UnionType) else {ann}  # float | None
    optional = type(None) in kinds
    kind = {int: "an integer", float: "a finite number", bool: "true or false"}.get(next(iter(kinds - {type(None)})))
    if kind is None or len(kinds - {type(None)}) != 1:
        return None
    ops = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    bounds = [f"{sign} {getattr(m, op)}" for m in field.metadata for op, sign in ops.items() if hasattr(m, op)]
    return " ".join([kind, " and ".join(bounds)]).strip() + (", or null" if optional else "")


def _explain(err: ValidationError, source: str) -> TunelineError:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    path = ".".join(str(p) for p in loc)
    if e["type"] == "extra_forbidden":
        known = _known_keys(loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = (
            f"did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?"
            if close
            else (f"known keys here: {', '.join(known)}")
        )
        return TunelineError(f"{source}: unknown key '{path}'", hint)
    field = _field(loc) if loc else None
    allowed = _allowed(field) if field is not None else None
    got = repr(e.get("input"))
    if e["type"] == "number_type":  # `--set train.lora_r=on`: say where the boolean came from
        got += f", which YAML reads from {'true/yes/on' if e.get('input') else 'false/no/off'}"
    if e["type"] == "value_error" and not (allowed or "").startswith(
        "one of"
    ):  # a rule across keys (a model validator): its message names them
        # Its message says what to change after ". Fix: " (tuneline/config.py's rules do).
        problem, _, fix = e["msg"].removeprefix("Value error, ").partition(". Fix: ")
        return TunelineError(
            f"{source}: {problem}" + (f" (in '{path}')" if path else ""), fix or f"change the keys it names in {source}"
        )
    if e["type"] == "list_type":  # `--set prepare.labels=neg,pos`: YAML reads a list only in brackets
        text = e["input"].strip() if isinstance(e.get("input"), str) else ""
        unclosed = text.startswith("[") != text.endswith("]")  # `[a,b`: one bracket, so YAML read text
        items = text.strip("[]").strip() or "a, b"
        return TunelineError(
            f"{source}: '{path}' must be a list (got {got}" + (", whose brackets do not pair up)" if unclosed else ")"),
            f"write it in brackets, e.g. {path}=[{items}] with --set, or `{loc[-1]}: [{items}]` in a YAML file",
        )
    if e["type"] == "dict_type":  # `--set prepare.columns=text`: a mapping is set one key at a time
        return TunelineError(
            f"{source}: '{path}' must be a mapping (got {got})",
            f"set one key at a time, e.g. --set {path}.<key>=<value>, or `{loc[-1]}: {{key: value}}` in a YAML file",
        )
    if e["type"] == "string_type" and isinstance(e.get("input"), dict):  # `--set prepare.source=hf:`
        return TunelineError(
            f"{source}: '{path}' must be text (got {got}): YAML reads a value that ends in ':', "
            "or holds ': ', as a mapping",
            f"quote the value, e.g. --set \"{path}='...'\"",
        )
    if allowed is None:
        return TunelineError(
            f"{source}: '{path}' {e['msg'].lower()} (got {got})",
            f"set a valid value for '{path}' in {source}",
        )
    fix = f"set '{path}' to {allowed}"
    if allowed.startswith("one of") and isinstance(e.get("input"), str):
        close = difflib.get_close_matches(e["input"], [str(c) for c in _choices(field)], n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"choose {allowed}"
    default = yaml.safe_dump(field.default, default_flow_style=True).strip().removesuffix("...").strip()
    return TunelineError(f"{source}: '{path}' must be {allowed} (got {got})", f"{fix} (default: {default})")


def parse_params(raw: dict[str, Any], source: str = PARAMS_FILE) -> Params:
    """Validate a raw mapping into `Params`, raising a one-line TunelineError."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise _explain(err, source) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    shown = io.shown(path) if path.is_absolute() else str(path)  # as typed, or from here when below it
    if not path.is_file():
        raise TunelineError(f"params file '{path}' not found", "run from the project root, where params.yaml lives")
    return parse_params(read_yaml(path, shown), shown)


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently; DVC then refuses the whole file)."""


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise TunelineError(
                f"key '{key}' is given twice (lines {seen[key]} and {key_node.start_mark.line + 1})",
                "keep one of them (the file must name each key once)",
            )
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _yaml_error(e: yaml.YAMLError, shown: str, text: str) -> TunelineError:
    """Where the YAML breaks, the line as written, and the usual cause's fix (it said only
    'not valid YAML (while scanning for the next token)' for a tab in params.yaml)."""
    mark, opened = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
    problem, context = getattr(e, "problem", None) or str(e).splitlines()[0], str(getattr(e, "context", ""))
    if mark is None:
        return TunelineError(f"{shown} is not valid YAML ({problem})", "correct the YAML syntax")
    lines, since = text.splitlines(), opened.line + 1 if opened is not None and opened.line != mark.line else None
    # the line it broke on; at the end of the file (an unclosed quote), the line that opened it
    at = mark.line if mark.line < len(lines) and lines[mark.line].strip() else (since or 0) - 1
    where = f"{shown} line {at + 1} ({lines[at].rstrip()!r})" if 0 <= at < len(lines) else shown
    if "'\\t'" in problem:  # a tab, as PyYAML writes it
        fix = "indent with spaces (YAML does not allow tabs)"
    elif "quoted scalar" in context and since:
        fix = f"close the quote opened on line {since}"
    elif "flow sequence" in context and since:
        fix = f"close the bracket opened on line {since}"
    elif "mapping values are not allowed" in problem:
        fix = "quote a value that holds ': ', and line a key up under the other keys of its group"
    else:
        fix = "indent each key two spaces under its group (train:, prepare:, ...), its siblings in line"
    return TunelineError(f"{where} is not valid YAML: {problem}", fix)


def read_yaml(path: Path, shown: str, allow_empty: bool = False) -> dict:
    """A params-style YAML file as a mapping, or one line naming what is wrong with it.
    `allow_empty`: a file of comments only means "all defaults" (a recipe may be one)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise TunelineError(f"{shown} is not UTF-8 text (byte {e.start})", "save it as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except TunelineError as e:
        raise TunelineError(f"{shown}: {e.problem}", e.fix) from None
    except yaml.YAMLError as e:
        raise _yaml_error(e, shown, text) from None
    if raw is None and allow_empty:
        return {}
    if raw is None:
        raise TunelineError(
            f"{shown} is empty",
            "restore it (`git checkout params.yaml`) or write one with `tuneline run --recipe NAME`",
        )
    if not isinstance(raw, dict):
        raise TunelineError(
            f"{shown} must be a mapping of stage groups (train:, prepare:, ...), not a {type(raw).__name__}",
            "restore it (`git checkout params.yaml`) or write one with `tuneline run --recipe NAME`",
        )
    return raw
