"""A source's raw rows as a task's rows: the task's columns found (mapped by
`prepare.columns`, or read under a name that differs only by invisible characters), every
value text, labels checked against the declared set, conversations parsed. The first bad
row stops with one line naming the file, the row and the fix, or (`prepare.bad_rows:
skip`) is left out and counted (tuneline/sources.py reads the rows; this gives them
meaning)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from tuneline import readers, sources
from tuneline.errors import TunelineError
from tuneline.readers import Batches
from tuneline.tasks import Task


def task_source(
    spec: str, prepare, where: str, hashes: bool = True, skipped: dict | None = None
) -> tuple[Batches, dict]:
    """Batches of validated task rows of one source under the `prepare` params, plus its
    lineage (`hashes`: with the local files' sha256, which reads them whole). Under
    `prepare.bad_rows: skip`, `skipped` (if given) receives the count of rows left out and
    the first reasons once the batches are read."""
    from tuneline.tasks import TASKS

    task = TASKS[prepare.task]
    raw, lineage, prose = sources.load(spec, streaming=prepare.hub_streaming, hashes=hashes)
    if prose:  # sentences for descramble, paragraphs for pretraining
        if task.prose is None:
            raise TunelineError(
                f"{where} '{spec}' is prose, but task '{task.name}' needs labelled rows",
                "use a file or hub dataset with the task's columns",
            )
        raw = (task.prose([r["text"] for r in batch], prepare.min_words, prepare.max_words) for batch in raw)
    where = f"{where} '{spec}'"
    return task_rows(raw, task, prepare.columns, prepare.labels, where, prepare.bad_rows, skipped), lineage


SKIP_EXAMPLES = 3  # reasons kept for the log, metrics/prepare.json and the model card
SKIP_CHECK_AFTER = 1000  # rows read before "more than half are bad" may stop a source early


def task_rows(
    batches: Iterable[list[dict]],
    task: Task,
    columns: dict[str, str],
    labels: list[str],
    where: str,
    bad_rows: str = "error",
    skipped: dict | None = None,
) -> Batches:
    """Batches of rows with exactly the task's columns, all text, labels checked against
    `labels`; the column mapping is settled on the first batch. A bad row raises, or with
    `bad_rows="skip"` is left out and counted into `skipped` ({"rows", "of", "examples"}).
    A blank row of a task that drops them (`Task.drops_blank`) is left out and counted."""
    names: dict[str, str | None] | None = None
    start, bad, blank, reasons, first_fix = 0, 0, 0, [], ""
    for rows in batches:
        if not rows:
            continue
        if names is None:  # a missing column is a setting, never a bad row: it always stops
            names = _column_names(rows, task, columns, where)
        kept = []
        for i, r in enumerate(rows):
            try:
                row = _task_row(r, names, task, labels, where, start + i)
            except TunelineError as e:
                if bad_rows != "skip":
                    raise
                bad += 1
                first_fix = first_fix or e.fix or ""
                if len(reasons) < SKIP_EXAMPLES:
                    reasons.append(e.problem.removeprefix(f"{where}: "))
                continue
            if row is None:
                blank += 1
            else:
                kept.append(row)
        start += len(rows)
        if bad and start >= SKIP_CHECK_AFTER:
            _too_many_bad(bad, start, reasons, first_fix, where)
        if kept:
            yield kept
    if names is None:
        raise TunelineError(f"{where} has no rows", "point it at a file or split with data")
    if blank:
        print(
            f"[prepare] {where}: left out {blank} blank {'row' if blank == 1 else 'rows'} of {start} (nothing to learn)"
        )
    if bad:
        _too_many_bad(bad, start, reasons, first_fix, where)
        noun = "row" if bad == 1 else "rows"
        print(f"[prepare] {where}: left out {bad} bad {noun} of {start} (prepare.bad_rows=skip), e.g. {reasons[0]}")
        if skipped is not None:
            skipped.update(rows=bad, of=start, examples=reasons)


def _too_many_bad(bad: int, seen: int, reasons: list[str], first_fix: str, where: str) -> None:
    """Stop when most rows are bad: a setting is then the likelier cause, though the data may
    be out of scope as a whole (tool-call conversations), so the first row's own fix is given
    too, without its "or skip the row" (skipping is what could not work)."""
    if 2 * bad > seen:
        own = first_fix.split(", or ")[0]
        raise TunelineError(
            f"{where}: {bad} of the first {seen} rows are bad, e.g. {reasons[0]}",
            (f"{own} (the first bad row's fix); " if own else "")
            + "that many usually points to a setting (prepare.columns, prepare.labels, prepare.task), not to a few "
            "bad rows: fix it (prepare.bad_rows=skip leaves out only a minority)",
        )


def _plain_name(name: str) -> str:
    """A column name as it reads: Unicode-normalised, without invisible characters
    (zero-width spaces, a byte-order mark) or surrounding spaces, as spreadsheets leave them."""
    import unicodedata

    visible = "".join(c for c in unicodedata.normalize("NFKC", name) if unicodedata.category(c) != "Cf")
    return visible.strip()


def _column_names(rows: list[dict], task: Task, columns: dict[str, str], where: str) -> dict[str, str | None]:
    keys: set[str] = set().union(*(r.keys() for r in rows[:1000])) - {readers.LINE}
    plain = {_plain_name(k): k for k in keys if isinstance(k, str)}
    names: dict[str, str | None] = {}
    for col in task.columns:
        name = columns.get(col, col)
        if name not in keys and name in plain:  # 'target ' or 'target\u200b' is the column meant
            print(f"[prepare] {where}: reading column {plain[name]!r} as '{name}'", flush=True)
            name = plain[name]
        if name not in keys and name != col and col in keys:
            # prepare.columns maps for every source: a test_source named `text` while the
            # source already says `target` would otherwise have no mapping that fits both
            print(f"[prepare] {where}: no column {name!r} (prepare.columns.{col}); reading its '{col}'", flush=True)
            name = col
        if name not in keys:
            alias = dict(task.aliases).get(col)
            name = alias if alias in keys and col not in columns else None
            if name is None and col not in task.optional:
                wanted = columns.get(col, col)
                have = ", ".join(repr(k) for k in sorted(keys, key=str)[:12])  # repr: invisible characters show
                close = difflib.get_close_matches(wanted, [str(k) for k in keys], n=1)
                taken = {columns.get(c, c) for c in task.columns if c != col} | set(names.values())
                left = [str(k) for k in keys if k not in taken]
                if not close and len(left) == 1:  # `emotion` for 'label': the one column no other reads
                    close = left
                fix = f"rename the column, or map one with --set prepare.columns.{col}=<column>"
                if close:  # the command to run, with the name filled in
                    fix = f"did you mean {close[0]!r}? map it with --set prepare.columns.{col}={close[0]}, or rename it"
                raise TunelineError(
                    f"{where}: missing column {wanted!r} for the {task.name} task (it has: {have})", fix
                )
        names[col] = name
    return names


def _at(r: dict, i: int) -> str:
    """Where row i is: its file line (CSV, JSONL), else its 1-based row number."""
    return r.get(readers.LINE) or f"row {i + 1}"


_FILL = "give that row a value in the column, or remove the row (prepare.bad_rows=skip leaves out such rows)"


def _task_row(r: dict, names: dict[str, str | None], task: Task, labels: list[str], where: str, i: int) -> dict | None:
    """The task's row, or None for a blank row of a task that drops them (Task.drops_blank)."""
    row = {}
    for col, name in names.items():
        if name and name not in r:  # a file that joins two datasets: this row says `response`, others `output`
            name = next((n for n in (col, dict(task.aliases).get(col)) if n and n in r), name)
        v = r.get(name) if name else None
        if v is None and (col in task.optional or name is None):
            v = ""
        elif v is None:  # a JSON row without the key, or with null: say so, not "holds NoneType"
            if name in r:
                raise TunelineError(f"{where}: {_at(r, i)} has no value (null) in column '{name}'", _FILL)
            have = ", ".join(repr(k) for k in sorted((k for k in r if k != readers.LINE), key=str)[:12])
            raise TunelineError(f"{where}: {_at(r, i)} has no column '{name}' (it has: {have or 'none'})", _FILL)
        if col == "label":
            v = _label(v, labels, where, _at(r, i), name)
        elif task.chat and col == "messages":
            from tuneline.chat import conversation

            v = conversation(v, f"{where}: {_at(r, i)}")
        elif not isinstance(v, str):
            raise TunelineError(
                f"{where}: column '{name}' must be text, but {_at(r, i)} holds {type(v).__name__} {str(v)[:40]!r}",
                "convert that column to strings, or map another column in prepare.columns",
            )
        elif not v.strip() and col not in task.optional:  # an empty answer teaches the model to say nothing
            if task.drops_blank:
                return None
            raise TunelineError(f"{where}: {_at(r, i)} has an empty '{name}'", _FILL)
        row[col] = v
    return row


def _numeral(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


def _label(v, labels: list[str], where: str, at: str, name: str | None) -> str:
    if isinstance(v, str) and v in labels:
        return v
    if isinstance(v, str) and _numeral(v):
        v = int(v)
    # Names that are numbers (ratings 1-5): a number is its name, never an id, or JSON's 1
    # would be read as labels[1] ('2') where the same file as CSV gives '1'
    numbered = any(map(_numeral, labels))
    if numbered and isinstance(v, int) and not isinstance(v, bool) and str(v) in labels:
        return str(v)
    if not numbered and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(labels):
        return labels[v]
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise TunelineError(
            f"{where}: column '{name}' must be a label name or id, but {at} holds {type(v).__name__} {v!r}",
            "convert labels to strings or integer ids",
        )
    near = [lab for lab in labels if isinstance(v, str) and _plain_name(v).casefold() == lab.casefold()]
    near = near or difflib.get_close_matches(str(v), labels, n=1, cutoff=0.75)
    if near:
        fix = f"did you mean {near[0]!r}? Correct that value in the file"
    else:
        fix = "add it to prepare.labels, or leave such rows out with prepare.bad_rows=skip (e.g. -1 marks unlabelled GLUE test rows)"
    raise TunelineError(f"{where}: {at} has label {v!r}, outside the declared set {labels}", fix)
