"""`tuneline diff A B`: what model B fixed and broke against model A, and what changed.

A and B are registered versions (`3`, `v3`), aliases (`champion`, `challenger`) or runs
(`runs:/ID`, or a run id). register logs with every version what a review needs: the
per-example records (eval/examples.json), the test rows they were scored on
(eval/rows.jsonl), and each example's prompt, reference and outputs
(eval/predictions.jsonl), and the champion it faced, as its gate scored that on these rows
(eval/faced.json). The comparison pairs examples: B against the champion it faced, on every
test example its gate compared, even when the champion's own evaluation was on others.
Otherwise, when the two were scored on different test examples (a grown source draws a
partly new test split), it pairs the examples both were scored on, and says so; when none
is shared, it gives each one's metric alone. The report:
- the examples B fixed and broke on the primary metric, largest change first, with the
  input, the reference and both answers. Each example's value is the metric computed on
  it alone (sentence chrF for chrF; right or wrong for accuracy, so a label flip is a
  fix or a break), and a change counts past `threshold`;
- the primary metric by slice, B against A with the gate's paired bootstrap CI restricted
  to the slice: by label (labelled tasks) and by input length (quartiles of the prompt's
  words), so a gain that hides a collapse shows;
- the lineage: the params that differ, the data hashes, the code commits, and the package
  versions each model pins.
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
from dataclasses import dataclass, replace

import numpy as np

from tuneline import registry, scoring, tasks
from tuneline.errors import TunelineError
from tuneline.provenance import (
    EVAL_ARTIFACT,
    FACED_ARTIFACT,
    NO_COMMIT,
    PREDICTIONS_ARTIFACT,
    ROWS_ARTIFACT,
    artifact_text,
)


@dataclass
class Side:
    """One model of the comparison, as register logged it."""

    label: str  # "v3 (champion)", "run 1a2b3c4d"
    run_id: str  # the MLflow run that logged the model
    record: dict  # eval/examples.json: examples_key, tuned (the model's per-example record), ...
    rows: list[dict]  # the test rows
    shown: list[dict]  # per row: prompt, target, tuned_output
    params: dict[str, str]  # the run's flattened params
    tags: dict[str, str]  # the version's tags ({} for a bare run)
    packages: dict[str, str]  # what the model pins (requirements.txt)
    faced: dict | None = None  # eval/faced.json: the champion its gate faced, on its rows (run_id, tuned)


def _download(run_id: str, path: str, ref: str) -> str:
    try:
        return artifact_text(run_id, path)
    except Exception:  # MlflowException, OSError: the artifact is not there
        raise TunelineError(
            f"'{ref}' has no {path} (it was registered before tuneline logged per-example results)",
            "compare versions registered by this tuneline, or evaluate the old one again with `tuneline evaluate`",
        ) from None


def _packages(source: str | None) -> dict[str, str]:
    try:
        text = artifact_text(uri=f"{source}/requirements.txt")
    except Exception:  # no model source (a bare run) or no requirements file
        return {}
    return dict(line.split("==", 1) for line in text.split() if "==" in line)


def side(client, name: str, ref: str) -> Side:
    """`ref` (a version, an alias or a run) of registered model `name`."""
    from mlflow.exceptions import MlflowException

    ref = ref.strip()
    version = None
    try:
        if m := re.fullmatch(r"runs:/([^/]+)(/.*)?", ref) or re.fullmatch(r"([0-9a-f]{32})", ref):
            run_id, label = m.group(1), f"run {m.group(1)[:8]}"
        else:
            version = registry.version(client, name, ref)
            run_id, label = version.run_id, f"v{version.version}" + ("" if re.fullmatch(r"v?\d+", ref) else f" ({ref})")
        params = dict(client.get_run(run_id).data.params)
    except (MlflowException, TunelineError) as err:
        if isinstance(err, TunelineError) and re.fullmatch(r"v?\d+", ref):
            raise  # a number that is no version: registry's line lists the versions there are
        if ref == registry.CHAMPION:  # the default A, before any version was promoted
            raise TunelineError(
                f"model '{name}' has no champion yet (no version was promoted), so there is nothing to compare with",
                "name two versions, e.g. `tuneline diff 1 2`; `tuneline history` gives each gate decision "
                "against the base model",
            ) from None
        raise TunelineError(
            f"'{ref}' is not a version, alias or run of model '{name}'",
            "name a version (3 or v3), an alias (champion, challenger) or runs:/RUN_ID; see `tuneline history`",
        ) from None
    record = json.loads(_download(run_id, EVAL_ARTIFACT, ref))
    rows = [json.loads(line) for line in _download(run_id, ROWS_ARTIFACT, ref).splitlines()]
    shown = [json.loads(line) for line in _download(run_id, PREDICTIONS_ARTIFACT, ref).splitlines()]
    tags = dict(version.tags) if version else {}
    faced = None
    with contextlib.suppress(Exception):  # none: the gate faced the base model, or an older tuneline registered it
        faced = json.loads(artifact_text(run_id, FACED_ARTIFACT))
    packages = _packages(version.source if version else None)
    return Side(label, run_id, record, rows, shown, params, tags, packages, faced)


def _metric(b: Side) -> tuple[tasks.Task, list[str], str]:
    """B's task, labels and primary metric, from its run's params."""
    task = tasks.TASKS[b.params["prepare.task"]]
    labels = ast.literal_eval(b.params.get("prepare.labels", "[]"))
    chosen = b.params.get("evaluate.primary_metric", "None")
    return task, labels, task.metrics[0] if chosen in ("None", "") else chosen


def changes(a: scoring.Stat, b: scoring.Stat, metric: str, threshold: float) -> tuple[list, list]:
    """(fixed, broken): [(example index, A's value, B's value)], largest change first. An
    example's value is the metric on it alone; a change counts when its gain (in the
    metric's good direction) is at least `threshold`."""
    sign = -1.0 if metric in scoring.LOWER_IS_BETTER else 1.0
    va = np.array([a.fn(v) for v in a.values])
    vb = np.array([b.fn(v) for v in b.values])
    gain = sign * (vb - va)
    order = np.argsort(-np.abs(gain), kind="stable")
    fixed = [(int(i), va[i], vb[i]) for i in order if gain[i] >= threshold]
    broken = [(int(i), va[i], vb[i]) for i in order if -gain[i] >= threshold]
    return fixed, broken


def slices(task: tasks.Task, rows: list[dict], prompts: list[str]) -> dict[str, np.ndarray]:
    """Example indices per slice: each label (labelled tasks), and input-length quartiles."""
    out = {}
    if task.labelled:
        for label in sorted({r["label"] for r in rows}):
            out[f"label {label}"] = np.array([i for i, r in enumerate(rows) if r["label"] == label])
    words = np.array([len(p.split()) for p in prompts])
    edges = np.unique(np.quantile(words, [0, 0.25, 0.5, 0.75, 1.0]).round().astype(int))
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        last = k == len(edges) - 2
        pick = (words >= lo) & ((words <= hi) if last else (words < hi))
        if pick.any():
            out[f"input {lo}-{hi if last else hi - 1} words"] = np.flatnonzero(pick)
    return out


def _sub(s: scoring.Stat, idx: np.ndarray) -> scoring.Stat:
    return scoring.Stat(s.values[idx], s.fn)


def report(a: Side, b: Side, threshold: float | None = None, show: int = 5) -> str:
    """The review of B against A, as Markdown. The bootstrap draws as B's gate did (its
    `seed` and `evaluate.n_bootstrap`), so B against the champion it faced gives the
    interval its gate reported."""
    if a.run_id == b.run_id:  # `tuneline diff` after the first run: v1 is champion and challenger
        raise TunelineError(
            f"{b.label} and {a.label} are the same model, so there is nothing to compare",
            "a run that registers another version makes a challenger; or name two versions, e.g. `tuneline diff 1 2`",
        )
    task, labels, metric = _metric(b)
    note = []
    if a.record.get("examples_key") != b.record.get("examples_key"):  # did either one's gate face the other?
        for old, new in ((a, b), (b, a)):
            if (new.faced or {}).get("run_id") == old.run_id:
                note = [
                    "",
                    f"{old.label} had been scored on other test examples or settings, so the gate scored it again "
                    f"on the {len(new.rows)} of {new.label}; these are the answers compared.",
                ]
                a, b = (_as_faced(a, b), b) if old is a else (a, _as_faced(b, a))
                break
    if a.record.get("examples_key") != b.record.get("examples_key"):
        common = _common(a, b)
        if common is None or len(common[1].rows) < MIN_PAIRED:
            return _unpaired(a, b, task, labels, metric, 0 if common is None else len(common[1].rows))
        note = [
            "",
            f"The two were scored on different test examples or settings; this pairs the {len(common[1].rows)} "
            f"examples both were scored on ({a.label} had {len(a.rows)}, {b.label} {len(b.rows)}), with the "
            f"outputs each logged, so it can differ from a gate that scored both on one set.",
        ]
        a, b = common
    sa, sb = (scoring.stat(task, metric, s.rows, s.record["tuned"], labels) for s in (a, b))
    if threshold is None:  # a flip for 0/1 metrics; else a tenth of the scale
        scale = 100.0 if metric in scoring.PERCENT else 1.0
        threshold = 0.5 if metric in scoring.BINARY else 1.0 if metric in scoring.LOWER_IS_BETTER else scale / 10
    fixed, broken = changes(sa, sb, metric, threshold)
    n_boot, seed = int(b.params.get("evaluate.n_bootstrap", 1000)), int(b.params.get("seed", 0))
    whole = scoring.compare(sb, sa, metric, "bootstrap", n_boot, seed)
    # Pretraining scores blocks of the concatenated test text, not rows: no row to show, no length to slice by.
    per_row = b.params.get("tokenize.packing") != "concat" and len(b.shown) == len(sb.values) == len(a.shown)
    unit = "test examples" if per_row else f"blocks of the test text ({b.params.get('tokenize.max_length')} tokens)"
    lines = [
        f"# {b.label} against {a.label}",
        "",
        f"{metric} {whole.a:.4g} against {whole.b:.4g}: delta {whole.delta:+.4g}, 95% CI "
        f"[{whole.ci_low:+.4g}, {whole.ci_high:+.4g}] on {whole.n} {unit}. "
        f"{len(fixed)} fixed and {len(broken)} broken (a change of at least {threshold:g} on one "
        f"{'example' if per_row else 'block'}).",
        *note,
    ]
    if not per_row:
        lines += ["", "A block is not a test row, so none is listed, and there are no slices by label or input length."]
        return "\n".join(lines + ["", *lineage(a, b)]) + "\n"
    for title, found in (("Fixed", fixed), ("Broken", broken)):
        lines += ["", f"## {title} ({len(found)})"]
        for i, va, vb in found[:show]:
            row = b.shown[i]
            lines += [
                "",
                f"- {metric} {va:.4g} -> {vb:.4g}",
                f"  - input: {_one_line(_input(task, b.rows[i], row['prompt']))}",
                f"  - reference: {_one_line(row['target'])}",
                f"  - {a.label}: {_one_line(a.shown[i]['tuned_output'])}",
                f"  - {b.label}: {_one_line(row['tuned_output'])}",
            ]
    lines += ["", "## By slice", "", f"| slice | n | {a.label} | {b.label} | delta (95% CI) |", "|---|---|---|---|---|"]
    for name, idx in slices(task, b.rows, [r["prompt"] for r in b.shown]).items():
        c = scoring.compare(_sub(sb, idx), _sub(sa, idx), metric, "bootstrap", n_boot, seed)
        lines.append(f"| {name} | {c.n} | {c.b:.4g} | {c.a:.4g} | {c.delta:+.4g} [{c.ci_low:+.4g}, {c.ci_high:+.4g}] |")
    return "\n".join(lines + ["", *lineage(a, b)]) + "\n"


MIN_PAIRED = 10  # fewer shared examples than this are too few to compare


def _common(a: Side, b: Side) -> tuple[Side, Side] | None:
    """A and B cut to the test rows both were scored on (the same row, every column), in
    B's order; None when they share none, or when either scored blocks of concatenated text
    (pretraining), which are not rows."""
    if "concat" in (a.params.get("tokenize.packing"), b.params.get("tokenize.packing")):
        return None
    where = {json.dumps(r, sort_keys=True): i for i, r in enumerate(a.rows)}
    pairs = [(where[k], j) for j, r in enumerate(b.rows) if (k := json.dumps(r, sort_keys=True)) in where]
    if not pairs:
        return None
    ia, ib = zip(*pairs)
    return _cut(a, ia), _cut(b, ib)


def _as_faced(old: Side, new: Side) -> Side:
    """`old` as `new`'s gate scored it: on new's test rows, with the answers of that evaluation."""
    tuned = new.faced["tuned"]
    shown = [s | {"tuned_output": o} for s, o in zip(new.shown, tuned.get("outputs") or [])]
    record = old.record | {"examples_key": new.record.get("examples_key"), "tuned": tuned}
    return replace(old, record=record, rows=new.rows, shown=shown)


def _cut(s: Side, idx: tuple[int, ...]) -> Side:
    """Side `s` on its rows `idx` only: the rows, what it showed, and every per-row list of
    its record (outputs, losses, labels scored, ended)."""
    n = len(s.rows)
    tuned = {k: [v[i] for i in idx] if isinstance(v, list) and len(v) == n else v for k, v in s.record["tuned"].items()}
    rows, shown = [s.rows[i] for i in idx], [s.shown[i] for i in idx]
    return replace(s, record=s.record | {"tuned": tuned}, rows=rows, shown=shown)


def _unpaired(a: Side, b: Side, task: tasks.Task, labels: list[str], metric: str, shared: int) -> str:
    """The review of two versions scored on different test examples or settings, with
    `shared` (< MIN_PAIRED) examples in common: each one's metric on its own examples (not
    a comparison), how to get one, and what changed."""
    own = []
    for s in (a, b):
        stat = scoring.stat(task, metric, s.rows, s.record["tuned"], labels)
        own.append(f"{stat.value():.4g} on its {len(stat.values)}")
    lines = [
        f"# {b.label} against {a.label}",
        "",
        (
            f"Only {shared} {'example pairs' if shared == 1 else 'examples pair'} up (fewer than {MIN_PAIRED})"
            if shared
            else "No example pairs up"
        )
        + ": the two were scored on different test examples or settings (prepare or evaluate params, or the data; "
        "see below), so there is no paired comparison, and no "
        f"fixed, broken or slices. {metric}: {a.label} {own[0]}, {b.label} {own[1]} examples, "
        f"each on its own. To compare them on one set, run `tuneline evaluate --model URI --data FILE` "
        f"for each (e.g. models:/NAME/VERSION) on the same file.",
    ]
    return "\n".join(lines + ["", *lineage(a, b)]) + "\n"


def _input(task: tasks.Task, row: dict, prompt: str) -> str:
    """What an example asked, as a reviewer reads it: the fields a request fills (a tweet,
    not the tweet inside the prompt's instructions and label list, which a one-line excerpt
    would cut), or for a conversation its last user turn (the rendered prompt starts with
    the system turn and earlier turns)."""
    if not task.chat:
        given = [f for f in task.serve_fields if str(row.get(f, "")).strip()]
        if len(given) == 1:
            return str(row[given[0]])
        return " · ".join(f"{f}: {row[f]}" for f in given) if given else prompt
    from tuneline import chat

    context, _ = chat.last_turn(row)
    asked = context[-1]["content"] if context and context[-1]["role"] == "user" else prompt
    earlier = sum(t["role"] != "system" for t in context) - 1
    return asked + (f" (after {earlier} earlier turn{'s' * (earlier != 1)})" if earlier > 0 else "")


def _one_line(text: str, width: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def lineage(a: Side, b: Side) -> list[str]:
    """What changed between the two: params, data, code, packages (Markdown lines)."""
    lines = ["## What changed", ""]
    differ = sorted(k for k in {*a.params, *b.params} if a.params.get(k) != b.params.get(k))
    lines.append(f"- params: {len(differ)} differ" + (":" if differ else ""))
    lines += [f"  - `{k}`: {a.params.get(k, '(unset)')} -> {b.params.get(k, '(unset)')}" for k in differ]
    for key in sorted(k for k in {*a.tags, *b.tags} if k.startswith("data.")):
        va, vb = a.tags.get(key, "?"), b.tags.get(key, "?")
        lines.append(f"- `{key}`: " + ("the same" if va == vb else f"{va} -> {vb}"))
    ca, cb = a.tags.get("git.commit", "?"), b.tags.get("git.commit", "?")
    if ca != cb:
        lines.append(f"- code: commits {ca}..{cb}")
    elif ca in ("?", NO_COMMIT):  # no tag, or a run made outside git
        lines.append("- code: commits unknown (not in git)")
    else:
        lines.append(f"- code: the same commit {ca}")
    pkgs = sorted(k for k in {*a.packages, *b.packages} if a.packages.get(k) != b.packages.get(k))
    lines.append(
        "- packages: "
        + (", ".join(f"{k} {a.packages.get(k, '-')} -> {b.packages.get(k, '-')}" for k in pkgs) or "the same pins")
    )
    return lines


# --- in every new version's run -------------------------------------------------------------

REPORT_MD, REPORT_HTML = "review/diff.md", "review/diff.html"


def html(markdown: str, title: str) -> str:
    """The report as a standalone HTML page (MLflow's artifact view shows it rendered)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def log_for_version(client, name: str, champion: str, version: str) -> str | None:
    """Register's review of the new `version` against the `champion` it was gated against,
    logged to the active run as Markdown and HTML; the path, or None (said why) when the
    two cannot be paired example by example."""
    import mlflow

    try:
        text = report(side(client, name, champion), side(client, name, version))
    except TunelineError as e:
        print(f"[register] no review against v{champion}: {e.problem}", flush=True)
        return None
    mlflow.log_text(text, REPORT_MD)
    mlflow.log_text(html(text, f"{name} v{version} against v{champion}"), REPORT_HTML)
    return REPORT_MD
