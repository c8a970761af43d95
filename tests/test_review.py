"""`tuneline diff` (tuneline/review.py): what a challenger fixed and broke, by slice, and
what changed, read from what register logs with each version, on a real (sqlite) registry."""

import json

import mlflow
import pytest
from typer.testing import CliRunner

from tuneline import review
from tuneline.cli import app
from tuneline.errors import TunelineError
from tuneline.provenance import EVAL_ARTIFACT, FACED_ARTIFACT, PREDICTIONS_ARTIFACT, ROWS_ARTIFACT

TARGETS = [
    "The cat sat on the mat.",
    "The university was founded in 1908.",
    "I went to the market yesterday.",
    "She reads a book every night before bed.",
    "The river flows quietly through the old town.",
    "We planted three trees in the garden last spring.",
]


def _register(
    client,
    rows,
    outputs,
    params,
    tags=None,
    key="k1",
    alias=None,
    task="descramble",
    nll=None,
    prompts=None,
    faced=None,
) -> str:
    """A version as register leaves it: params on its run, the three eval artifacts, tags.
    `nll`: each scored unit's loss over 5 tokens (default: 1.0 for each row). `faced`:
    (version, its outputs on these rows) of the champion its gate faced."""
    nll = [1.0] * len(rows) if nll is None else nll
    with mlflow.start_run() as run:
        mlflow.log_params({"prepare.task": task, "evaluate.primary_metric": "None", **params})
        record = {"examples_key": key, "tuned": {"outputs": outputs, "nll": nll, "tokens": [5] * len(nll)}}
        record["tuned"]["scored"] = None
        mlflow.log_text(json.dumps(record), EVAL_ARTIFACT)
        if faced:
            champion = {"run_id": client.get_model_version("m", faced[0]).run_id, "version": faced[0]}
            tuned = {"outputs": faced[1], "nll": nll, "tokens": [5] * len(nll), "scored": None}
            mlflow.log_text(json.dumps(champion | {"tuned": tuned}), FACED_ARTIFACT)
        mlflow.log_text("".join(json.dumps(r) + "\n" for r in rows), ROWS_ARTIFACT)
        shown = [
            {
                "prompt": p or f"Unscramble: {r.get('source', r.get('text'))}\nSentence:",
                "target": json.loads(r["messages"])[-1]["content"]
                if task == "chat"
                else r.get("target", r.get("label")),
                "tuned_output": o,
            }
            for r, o, p in zip(rows, outputs, prompts or [None] * len(rows))
        ]
        mlflow.log_text("".join(json.dumps(s) + "\n" for s in shown), PREDICTIONS_ARTIFACT)
    v = str(client.create_model_version("m", source="file:///nowhere", run_id=run.info.run_id).version)
    for k, val in (tags or {}).items():
        client.set_model_version_tag("m", v, k, val)
    if alias:
        client.set_registered_model_alias("m", alias, v)
    return v


def _descramblers(client):
    rows = [{"source": " ".join(reversed(t.split())), "target": t} for t in TARGETS]
    a = list(TARGETS)
    a[1] = "founded was university The in 1908."  # A gets example 1 wrong
    b = list(TARGETS)
    b[4] = "Old the town flows river the quietly through."  # B breaks example 4
    tags_a = {"git.commit": "aaa111", "data.prepare.md5": "d1"}
    tags_b = {"git.commit": "bbb222", "data.prepare.md5": "d1"}
    _register(client, rows, a, {"train.lr": "0.002", "train.max_steps": "0"}, tags_a, alias="champion")
    _register(client, rows, b, {"train.lr": "0.002", "train.max_steps": "20"}, tags_b, alias="challenger")


def test_the_report_shows_what_was_fixed_and_broken_by_slice_and_what_changed(client):
    _descramblers(client)
    text = review.report(review.side(client, "m", "champion"), review.side(client, "m", "challenger"))
    assert text.startswith("# v2 (challenger) against v1 (champion)")
    assert "1 fixed and 1 broken" in text
    fixed = text.split("## Fixed (1)")[1].split("## Broken")[0]
    assert "The university was founded in 1908." in fixed and "founded was university The in 1908." in fixed
    broken = text.split("## Broken (1)")[1].split("## By slice")[0]
    assert "Old the town flows river the quietly through." in broken and "- v1 (champion): The river" in broken
    table = text.split("## By slice")[1].split("## What changed")[0]
    assert table.count("| input ") >= 2 and "95% CI" in table  # length buckets, each with its paired CI
    changed = text.split("## What changed")[1]
    assert "params: 1 differ" in changed and "`train.max_steps`: 0 -> 20" in changed
    assert "`data.prepare.md5`: the same" in changed and "commits aaa111..bbb222" in changed


def test_reading_a_version_leaves_no_copies_in_the_temporary_folder(client, tmp_path, monkeypatch):
    # MLflow copies a run's artifacts into a temporary folder of its own and never removes
    # it: one more folder in /tmp for every register and every `tuneline diff`.
    import tempfile

    _descramblers(client)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    side = review.side(client, "m", "champion")
    assert len(side.rows) == len(TARGETS) and side.record["examples_key"] == "k1"
    assert list(scratch.iterdir()) == []


def test_a_label_flip_is_a_fix_or_a_break_and_each_label_is_a_slice(client):
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate(["joy", "joy", "fear", "fear", "joy", "fear"])]
    a = ["joy", "fear", "fear", "fear", "joy", "fear"]  # wrong on 1
    b = ["joy", "joy", "fear", "joy", "joy", "fear"]  # fixes 1, breaks 3
    params = {"prepare.labels": str(["joy", "fear"])}
    va = _register(client, rows, a, params, task="classify")
    vb = _register(client, rows, b, params, task="classify")
    text = review.report(review.side(client, "m", va), review.side(client, "m", f"v{vb}"))
    assert "accuracy" in text and "1 fixed and 1 broken" in text
    assert "| label fear | 3 |" in text and "| label joy | 3 |" in text
    assert "- code: commits unknown (not in git)" in text  # neither version has a git.commit tag
    # the input is the tweet, not the prompt around it (instructions and the label list)
    assert "  - input: t1\n  - reference: joy" in text and "Unscramble" not in text


def test_an_instruction_answer_counts_as_fixed_or_broken_by_a_tenth_of_its_rouge_l(client):
    """ROUGE-L runs from 0 to 1: the default threshold of chrF's 0-100 scale (10) counted
    nothing, so every Alpaca or chat review said "0 fixed and 0 broken"."""
    refs = ["Red, blue and yellow.", "Paris is the capital.", "Drink water and sleep.", "It is 4."]
    rows = [{"instruction": f"q{i}", "input": "", "output": r} for i, r in enumerate(refs)]
    a = ["Red, blue and yellow.", "I do not know.", "Drink water and sleep well.", "It is 4."]  # 1 wrong
    b = ["Red, blue and yellow.", "Paris is the capital.", "Drink water and sleep well.", "Five."]  # 1 fixed, 3 broken
    rows[1]["input"] = "France"  # a second field: both shown by name
    va, vb = (_register(client, rows, o, {}, task="instruct") for o in (a, b))
    text = review.report(review.side(client, "m", va), review.side(client, "m", vb))
    assert "rouge_l" in text and "1 fixed and 1 broken (a change of at least 0.1 on one example)" in text
    assert "  - input: instruction: q1 · input: France\n" in text and "  - input: q3\n" in text


def test_a_conversation_is_shown_by_its_last_user_turn_not_the_start_of_its_prompt(client):
    """The rendered prompt starts with the system turn and the earlier turns: a one-line
    excerpt of it showed the first question beside the answers to the last."""

    def conv(*turns):
        roles = ["system", *["user", "assistant"] * len(turns)]
        return [{"role": r, "content": c} for r, c in zip(roles, ["Be brief.", *turns])]

    convs = [
        conv("Find synonyms of 'tenacious'.", "Persistent.", "Suggest a restaurant in Los Angeles.", "Rossoblu."),
        conv("Name a primary colour.", "Red."),
    ]
    rows = [{"messages": json.dumps(c)} for c in convs]
    prompts = ["".join(f"<|{t['role']}|>\n{t['content']}\n" for t in c[:-1]) + "<|assistant|>\n" for c in convs]
    va = _register(client, rows, ["Try Rossoblu.", "Blue."], {}, task="chat", prompts=prompts)
    vb = _register(client, rows, ["I cannot say.", "Red."], {}, task="chat", prompts=prompts)
    text = review.report(review.side(client, "m", va), review.side(client, "m", vb))
    assert "  - input: Suggest a restaurant in Los Angeles. (after 2 earlier turns)\n  - reference: Rossoblu." in text
    assert "  - input: Name a primary colour.\n  - reference: Red." in text
    assert "synonyms" not in text


def test_a_pretrained_models_blocks_are_counted_and_no_row_is_shown_for_one(client):
    """Pretraining scores perplexity on blocks of the concatenated test text, which are not
    its rows: the review of a second pretrained version (every register after the first)
    crashed on an IndexError, and the version stayed registered without its evidence."""
    rows = [{"text": "The history of the city."}, {"text": "It rained all day."}]
    params = {"tokenize.packing": "concat", "tokenize.max_length": "128"}
    va = _register(client, rows, ["", ""], params, task="pretrain", nll=[10.0] * 5)
    vb = _register(client, rows, ["", ""], params, task="pretrain", nll=[5.0, 5.0, 20.0, 5.0, 5.0])
    text = review.report(review.side(client, "m", va), review.side(client, "m", vb))
    assert "on 5 blocks of the test text (128 tokens). 4 fixed and 1 broken" in text
    assert "## Fixed" not in text and "## By slice" not in text and "## What changed" in text


def test_versions_scored_on_other_examples_show_what_changed_and_unknown_refs_are_one_line(client):
    targets = [f"{t.rstrip('.')} in year {i}." for i in range(4) for t in TARGETS]  # 24 distinct sentences
    rows = [{"source": t, "target": t} for t in targets]
    _register(client, rows[:16], targets[:16], {}, key="k1")
    out = list(targets[4:])
    out[0], out[14] = "quietly flows The river.", "zzz an answer only v2 has."
    _register(client, rows[4:], out, {}, key="k2")  # a partly new test split: rows 4-15 shared
    text = review.report(review.side(client, "m", "1"), review.side(client, "m", "2"))
    assert "on 12 test examples. 0 fixed and 1 broken" in text  # row 18's answer is not v1's to compare
    assert "pairs the 12 examples both were scored on (v1 had 16, v2 20)" in text
    assert f"- reference: {targets[4]}\n  - v1: {targets[4]}\n  - v2: quietly flows The river." in text
    assert "zzz" not in text
    assert "## By slice" in text and "## What changed" in text
    # Too few shared (or none): each side's metric on its own examples, no paired comparison, and what changed
    _register(client, rows[14:], targets[14:], {}, key="k3")
    text = review.report(review.side(client, "m", "1"), review.side(client, "m", "3"))
    assert text.startswith("# v3 against v1\n\nOnly 2 examples pair up (fewer than 10): the two were scored on")
    assert "chrf: v1 100 on its 16, v3 100 on its 10 examples, each on its own" in text
    assert "## What changed" in text and "## By slice" not in text and "delta" not in text
    _register(client, rows[16:], targets[16:], {}, key="k4")
    text = review.report(review.side(client, "m", "1"), review.side(client, "m", "4"))
    assert text.startswith("# v4 against v1\n\nNo example pairs up: the two were scored on different test examples")
    with pytest.raises(TunelineError, match=r"model 'm' has no version 9. Fix: choose one of: 4, 3, 2, 1$"):
        review.side(client, "m", "v9")  # as promote and export say it
    old = client.create_model_version("m", source="file:///nowhere", run_id=mlflow.start_run().info.run_id).version
    mlflow.end_run()
    with pytest.raises(TunelineError, match=r"has no eval/examples.json \(it was registered before"):
        review.side(client, "m", str(old))


def test_a_champion_its_gate_evaluated_again_on_new_rows_is_compared_on_every_one_of_them(client):
    """A changed prepare param draws other test rows: the gate scores the champion on the
    challenger's rows, and the review pairs those answers, not the none the two share."""
    targets = [f"{t.rstrip('.')} in year {i}." for i in range(4) for t in TARGETS]  # 24 distinct sentences
    rows = [{"source": t, "target": t} for t in targets]
    v1 = _register(client, rows[:12], targets[:12], {}, key="k1")
    again = list(targets[12:])
    again[3] = "year in 2 flows quietly The river."  # v1's answer on v2's row 3, as v2's gate scored it
    v2 = _register(client, rows[12:], targets[12:], {}, key="k2", faced=(v1, again))
    text = review.report(review.side(client, "m", v1), review.side(client, "m", v2))
    assert "No example pairs up" not in text
    assert "v1 had been scored on other test examples or settings, so the gate scored it again on the 12 of v2" in text
    assert "on 12 test examples. 1 fixed and 0 broken" in text
    assert f"- v1: year in 2 flows quietly The river.\n  - v2: {targets[15]}" in text
    back = review.report(review.side(client, "m", v2), review.side(client, "m", v1))  # `tuneline diff 2 1`
    assert "v1 had been scored on other test examples" in back and "on 12 test examples. 0 fixed and 1 broken" in back
    # Against a version its gate did not face, the review pairs what the two logged, as before
    v3 = _register(client, rows[12:], targets[12:], {}, key="k3")
    assert "No example pairs up" in review.report(review.side(client, "m", v1), review.side(client, "m", v3))


def test_the_command_compares_the_challenger_with_the_champion_and_saves_markdown(client, tmp_path):
    _descramblers(client)
    result = CliRunner().invoke(app, ["diff", "--name", "m", "--out", str(tmp_path / "review.md")])
    assert result.exit_code == 0, result.output
    assert "# v2 (challenger) against v1 (champion)" in result.output
    assert (tmp_path / "review.md").read_text().startswith("# v2 (challenger) against v1 (champion)")
    bad = CliRunner().invoke(app, ["diff", "--name", "m", "champion", "nope"])
    assert bad.exit_code != 0 and "'nope' is not a version, alias or run" in bad.output
    for threshold in ("0", "-1"):  # every unchanged example would count as fixed and as broken
        bad = CliRunner().invoke(app, ["diff", "--name", "m", "--threshold", threshold])
        assert (
            bad.exit_code == 2
            and f"error: --threshold {threshold} is not a change. Fix: give a number > 0" in bad.output
        )


def test_without_a_champion_the_default_comparison_says_so_in_one_line(client):
    # A first run the gate did not promote: v1 is the challenger, and there is no champion.
    rows = [{"source": t, "target": t} for t in TARGETS]
    _register(client, rows, TARGETS, {}, alias="challenger")
    result = CliRunner().invoke(app, ["diff", "--name", "m"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: model 'm' has no champion yet (no version was promoted), so there is nothing to compare with. "
        "Fix: name two versions, e.g. `tuneline diff 1 2`; `tuneline history` gives each gate decision against "
        "the base model"
    ]


def test_a_version_against_itself_is_one_line_not_an_empty_report(client):
    # After the first run v1 is both champion and challenger: `tuneline diff` compared v1 with v1.
    rows = [{"source": t, "target": t} for t in TARGETS]
    v = _register(client, rows, TARGETS, {}, alias="champion")
    client.set_registered_model_alias("m", "challenger", v)
    result = CliRunner().invoke(app, ["diff", "--name", "m"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: v1 (challenger) and v1 (champion) are the same model, so there is nothing to compare. Fix: a run that "
        "registers another version makes a challenger; or name two versions, e.g. `tuneline diff 1 2`"
    ]


def test_the_whole_comparison_draws_as_the_gate_did(client):
    """The same seed and bootstrap size as B's gate (its run's params), so B against the
    champion it faced shows the interval the gate reported, not another draw of it."""
    from tuneline import scoring, tasks

    rows = [{"source": " ".join(reversed(t.split())), "target": t} for t in TARGETS]
    a, b = list(TARGETS), list(TARGETS)
    a[1], a[3] = "founded was university The in 1908.", "She reads a book before bed every night."
    b[4] = "Old the town flows river the quietly through."
    gate = {"seed": "7", "evaluate.n_bootstrap": "300"}
    _register(client, rows, a, gate, alias="champion")
    _register(client, rows, b, gate, alias="challenger")
    text = review.report(review.side(client, "m", "champion"), review.side(client, "m", "challenger"))

    task = tasks.TASKS["descramble"]
    sa, sb = (scoring.stat(task, "chrf", rows, {"outputs": o, "nll": [1.0] * 6, "tokens": [5] * 6}, []) for o in (a, b))
    as_gate = scoring.compare(sb, sa, "chrf", "bootstrap", 300, 7)
    other = scoring.compare(sb, sa, "chrf", "bootstrap", 1000, 0)
    assert (other.ci_low, other.ci_high) != (as_gate.ci_low, as_gate.ci_high)  # the draw shows in the interval
    assert f"95% CI [{as_gate.ci_low:+.4g}, {as_gate.ci_high:+.4g}] on 6 test examples" in text
