"""A served request as its task reads it: the row it stands for and the prompt it is
answered after (tuneline/serving.py), and the task's prompt as a `str.format` template over
the fields a request fills (the exported model's transformers example, tuneline/export.py).

Apart from tuneline/tasks.py, which every stage imports: reading requests is serving's,
so an edit here re-runs no stage (the stage deps are derived from imports).
"""

from __future__ import annotations

import contextlib
import json

from tuneline.tasks import Task


def prompt_format(task: Task, labels: list[str], given: tuple[str, ...]) -> str:
    """The task's prompt as a `str.format` template over its `serve_fields`, for a request
    that gives the fields in `given` (the others empty: instruct's Context block is there
    only with an input). The export's transformers example fills it."""
    marks = {f: f"\x00{f}\x00" for f in task.serve_fields}  # no prompt holds these
    row = {c: "" for c in task.columns} | {f: marks[f] for f in given}
    text = task.prompt(row, labels).replace("{", "{{").replace("}", "}}")
    for field, mark in marks.items():
        text = text.replace(mark, "{" + field + "}")
    return text


def row(task: Task, request: str | dict) -> dict:
    """The row a served request stands for: a bare text fills the first of the task's
    `serve_fields` (or is read by its `serve_row`); named fields, as a dict or its JSON text,
    fill theirs. ValueError saying what is wrong with it."""
    other = {alias: column for column, alias in task.aliases}  # Dolly's `context` is Alpaca's `input`
    if isinstance(request, str) and task.serve_fields and request.lstrip().startswith("{"):
        with contextlib.suppress(json.JSONDecodeError):  # else a text that starts with a brace
            named = json.loads(request)
            # A task of several fields reads any object as its fields (refusing one it does not
            # read); a task of one, only an object that names its field: other JSON stays text.
            fields = {other.get(k, k) for k in named} if isinstance(named, dict) else set()
            if isinstance(named, dict) and (len(task.serve_fields) > 1 or fields and fields <= set(task.serve_fields)):
                request = named
    blank = {c: "" for c in task.columns}
    if isinstance(request, dict):
        # None or NaN: a field this request left out of a served frame that others named
        named = {other.get(k, k): "" if v is None or v != v else str(v) for k, v in request.items()}
        if unknown := [k for k in named if k not in task.serve_fields]:
            raise ValueError(f"names {', '.join(map(repr, unknown))}, which the {task.name} task does not read")
        # the first field is what a request is about (descramble's `source` is optional in
        # data, where prepare makes it from the sentence, never in a request)
        needed = [f for i, f in enumerate(task.serve_fields) if i == 0 or f not in task.optional]
        if missing := [f for f in needed if not named.get(f, "").strip()]:
            raise ValueError(f"has no {' and no '.join(map(repr, missing))}")
        return blank | named
    if task.serve_row is not None:
        return blank | task.serve_row(str(request))
    return blank | {task.serve_fields[0]: str(request)}


def prompt(task: Task, request: str | dict, labels: list[str]) -> str:
    """The prompt a served request is answered after: the task's prompt for the row it
    stands for (a task that reads no fields, pretrain, continues the text itself)."""
    if not task.serve_fields and not isinstance(request, dict):
        return str(request)
    return task.prompt(row(task, request), labels)
