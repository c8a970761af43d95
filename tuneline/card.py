"""The model card: markdown written as the registered version's description, so the MLflow
UI shows on the version page what it is, where its data came from, how it scores against
its base model, why the gate decided what it did, and what it is (not) for."""

from __future__ import annotations

import math
import os

from tuneline import tasks
from tuneline.config import Params

LINEAGE_FILES = 5  # a glob source's files listed with their hashes; the rest are counted

# The params a reader needs to reproduce or judge the run (the rest are tagged on the version).
KEY_PARAMS = (
    "seed",
    "model.name",
    "prepare.task",
    "prepare.source",
    "prepare.test_source",
    "prepare.n_train",
    "tokenize.max_length",
    "tokenize.packing",
    "train.method",
    "train.epochs",
    "train.max_steps",
    "train.lr",
    "train.batch_size",
    "train.grad_accum",
    "train.lora_r",
    "train.lora_alpha",
    "train.lora_layers",
    "train.precision",
    "prepare.n_test",
    "evaluate.num_beams",
    "register.min_delta",
    "register.alpha",
    "register.test",
)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _cell(text: str, width: int = 90) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


# MLflow stores a version description in a 5000-character column (enforced by Postgres).
MAX_CHARS = 5000


def _lineage(which: str, rec: dict) -> list[str]:
    """A source's line: its revision or hash; a source of several files (a glob) lists each
    file's hash below it, up to LINEAGE_FILES of them."""
    head = f"- {which}: `{rec.get('source', '?')}`"
    digest = rec.get("sha256")
    if rec.get("revision"):
        return [f"{head}, revision `{rec['revision']}`"]
    if not digest:
        return [f"{head}, no recorded hash"]
    if isinstance(digest, dict) and len(digest) == 1:  # one local file: {path: hash}
        digest = next(iter(digest.values()))
    if isinstance(digest, str):
        return [f"{head}, sha256 `{digest}`"]
    files = sorted(digest.items())
    out = [f"{head}, {len(files)} files, sha256 of each:"]
    out += [f"  - `{os.path.normpath(path)}`: `{h}`" for path, h in files[:LINEAGE_FILES]]
    if len(files) > LINEAGE_FILES:
        out.append(
            f"  - and {len(files) - LINEAGE_FILES} more (every file's hash: `data/prepared/lineage.json`, versioned by DVC)"
        )
    return out


def description(**kw) -> str:
    """The card with sample cells narrowed until it fits MLflow's description column."""
    for width in (90, 50, 24):
        text = render(width=width, **kw)
        if len(text) <= MAX_CHARS:
            return text
    return text[: MAX_CHARS - 60] + "\n\n…(cut to fit; the run's model_card.md is whole)\n"


def _repeated(gate: dict, alpha: float) -> list[str]:
    """Repeated testing: which decision on these test examples this was, its level, and the
    smallest effect it could detect."""
    if "decision_on_these_examples" not in gate:
        return []
    k, level, mde = gate["decision_on_these_examples"], gate["level"], gate.get("detectable_effect", math.nan)
    lines = [
        f"Repeated testing: decision {k} on these test examples, tested at level {level:.3g} "
        f"(register.alpha={alpha} spent as alpha·6/(π²k²): the levels of every decision on one test sample sum to "
        "alpha, so re-testing nightly cannot wear the gate down; refresh the test sample to start again)."
    ]
    if math.isfinite(mde):
        lines[0] += (
            f" At this level, on {gate['n']} examples, a true {gate['metric']} gain of {abs(mde):.3g} is found "
            "80% of the time; smaller ones mostly are not."
        )
    return [*lines, ""]


def _audit(prepared: dict, params: Params) -> list[str]:
    """What prepare's metrics say about the data: the near-duplicate audit of train against
    val/test, the rows left out as bad (prepare.bad_rows=skip), the exact test_source overlaps."""
    cfg = params.prepare
    if "near_duplicates" not in prepared:
        return [f"- near-duplicate audit: off (prepare.near_dup_threshold: {cfg.near_dup_threshold})"]
    n = prepared["near_duplicates"]
    what = {"drop": "removed from train", "report": "kept in train", "error": "none allowed"}[cfg.on_overlap]
    lines = [
        f"- near-duplicate audit (word uni+bigram Jaccard >= {cfg.near_dup_threshold} with a val/test row): "
        f"{n} training rows ({what})"
    ]
    for p in prepared.get("near_duplicate_pairs", [])[:3]:
        lines.append(f"  - {p['similarity']:.2f}: `{_cell(p['train'], 70)}` ~ {p['split']} `{_cell(p['other'], 70)}`")
    for which in ("source", "test_source"):  # prepare.bad_rows=skip
        bad = prepared.get(f"bad_rows_{which}")
        if bad:
            lines.append(f"- bad rows left out of {which} (prepare.bad_rows=skip): {bad['rows']} of {bad['of']}")
            lines += [f"  - {_cell(reason, 140)}" for reason in bad["examples"]]
    if "overlap_dropped_from_train" in prepared or "overlap_kept_in_train" in prepared:
        dropped = prepared.get("overlap_dropped_from_train")
        lines.append(
            f"- exact duplicates of test_source rows: {dropped} removed from train"
            if dropped is not None
            else f"- exact duplicates of test_source rows: {prepared['overlap_kept_in_train']} kept in train"
        )
    return lines


def _guardrails(guards: list[dict]) -> list[str]:
    if not guards:
        return []
    lines = [
        "Guardrails (non-inferiority against the champion, Holm-corrected with the primary test):",
        "",
        "| guardrail | margin | challenger | champion | delta | p-value | holds |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {g['metric']} | {g['margin']:g} | {_fmt(g['challenger'])} | {_fmt(g['champion'])} | {g['delta']:+.4g} | "
        f"{g['p_value']:.3g} | {'yes' if g.get('holds') else '**no**'} |"
        for g in guards
    ]
    return [*lines, ""]


def _promptings(evals: dict) -> str:
    """Which prompting of the base model won, and what each scored on the primary metric."""
    won, by, m = evals.get("base_prompting", "plain"), evals.get("base_by_prompting", {}), evals["primary_metric"]
    tried = ", ".join(f"{kind} {_fmt(res[m])}" for kind, res in by.items())
    return f"{won} (the best of the ways tried on {m}: {tried})" if len(by) > 1 else won


def render(
    *,
    name: str,
    version: str,
    params: Params,
    flat: dict,
    evals: dict,
    gate: dict,
    samples: list[dict],
    lineage: dict,
    data_hashes: dict,
    commit: str,
    train: dict,
    review: str | None = None,
    prepared: dict | None = None,
    width: int = 90,
) -> str:
    task = tasks.TASKS[params.prepare.task]
    t = params.train
    method = (
        f"LoRA (r={t.lora_r}, alpha={t.lora_alpha}" + (f", top {t.lora_layers} blocks)" if t.lora_layers else ")")
        if t.method == "lora"
        else "full fine-tuning"
    )
    lines = [
        f"# {name} v{version}",
        "",
        f"**Task** {task.name} · **base model** `{params.model.name}` · **method** {method} · "
        f"**git commit** `{commit}`",
        "",
        "## Gate decision",
        "",
        f"**{gate['decision']}**: {gate['reason']}",
        "",
        "| metric | challenger | compared with | reference | delta | 95% CI | p-value | test | n |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {gate['metric']} | {_fmt(gate['challenger_value'])} | {gate['compared_with']} | "
        f"{_fmt(gate['reference_value'])} | {gate['delta']:+.4g} | [{gate['ci_low']:+.4g}, {gate['ci_high']:+.4g}] | "
        f"{gate['p_value']:.3g} | {gate['test']} | {gate['n']} |",
        "",
        f"Promotion needs: better than the reference, by at least register.min_delta={params.register.min_delta}, "
        f"with p below this decision's share of register.alpha={params.register.alpha}, and every guardrail held.",
        "",
        *_repeated(gate, params.register.alpha),
        *_guardrails(gate.get("guardrails") or []),
        *(
            [
                f"What this version fixed and broke against {gate['compared_with']}, by slice, and what changed: "
                f"`{review}` (and `.html`) in this version's MLflow run, or `tuneline diff` in a terminal.",
                "",
            ]
            if review
            else []
        ),
        f"## Metrics: base against tuned ({evals['n_examples']} test examples, the same for both)",
        "",
        f"The base model is prompted {_promptings(evals)}.",
        "",
        "| metric | base | tuned | delta |",
        "|---|---|---|---|",
    ]
    for m in task.metrics:
        lines.append(
            f"| {m}{' (primary)' if m == evals['primary_metric'] else ''} | {_fmt(evals['base'][m])} | "
            f"{_fmt(evals['tuned'][m])} | {evals['tuned'][m] - evals['base'][m]:+.4g} |"
        )
    c = evals["tuned_vs_base"]
    lines += [
        "",
        f"Tuned minus base on {c['metric']}: {c['delta']:+.4g}, paired bootstrap 95% CI "
        f"[{c['ci_low']:+.4g}, {c['ci_high']:+.4g}], p={c['p_value']:.3g} ({c['test']}).",
        "",
        "## Data lineage",
        "",
    ]
    for which, rec in lineage.items():
        lines += _lineage(which, rec)
    for key, md5 in data_hashes.items():
        lines.append(f"- {key.removeprefix('data.').replace('.md5', '')} data (dvc.lock md5): `{md5}`")
    if prepared is not None:
        lines += _audit(prepared, params)
    lines += ["", "## Params", "", "| param | value |", "|---|---|"]
    lines += [f"| {k} | `{_cell(flat[k], 60)}` |" for k in KEY_PARAMS if k in flat and flat[k] is not None]
    if train:
        lines += [
            f"| (trained) steps | {train.get('steps')} (best validation loss {_fmt(train.get('best_val_loss'))} "
            f"at step {train.get('best_step')}) |"
        ]
    lines += [
        "",
        f"## Sample predictions ({len(samples)})",
        "",
        "| input | reference | base | tuned |",
        "|---|---|---|---|",
    ]
    for s in samples:
        lines.append(
            f"| {_cell(s['prompt'], width)} | {_cell(s['target'], width)} | {_cell(s['base_output'], width)} | "
            f"{_cell(s['tuned_output'], width)} |"
        )
    lines += [
        "",
        "## Intended use",
        "",
        task.use,
        "",
        "## Limits",
        "",
        f"{task.limits} The scores above hold for this test split; measure on your own data with "
        f"`tuneline evaluate --model models:/{name}/{version} --recipe <recipe> --data <file>`.",
        "",
    ]
    return "\n".join(lines)
