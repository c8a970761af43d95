"""Generation, per-example losses and label scoring, each checked against plain one-at-a-time code."""

import json
import math

import pytest
import torch
from conftest import generate_beams, tiny_llama

from tuneline import recipes, tasks
from tuneline.errors import TunelineError
from tuneline.evaluation import (
    evaluate_file,
    evaluate_model,
    example_nll,
    fit_rows,
    metrics_of,
    prompts_and_targets,
    score_labels,
)
from tuneline.generation import generate
from tuneline.tokenization import answer_start, encode_batch

PROMPTS = [
    "Unscramble: cat the sat\nSentence:",
    "Unscramble: on the mat a dog lay quietly today\nSentence:",
    "Unscramble: hills\nSentence:",
    "Unscramble: over ran dogs the old red barns near the river\nSentence:",
    "Unscramble: x\nSentence:",
    "Unscramble: the rain in spain stays mainly\nSentence:",
]


@pytest.fixture(params=["gpt2", "llama"])
def model(request, tiny_gpt2, gpt2_tok):
    return tiny_gpt2 if request.param == "gpt2" else tiny_llama(len(gpt2_tok))


def _one_at_a_time(model, tok, prompt: str, max_new: int, num_beams: int = 1) -> str:
    """What a plain HF loop does: no padding, the prompt's own length stripped."""
    return generate_beams(model, tok, [prompt], max_new, num_beams)[0].split("\n")[0].strip()


@pytest.mark.parametrize("num_beams", [1, 2])
def test_batched_generation_equals_one_prompt_at_a_time(model, gpt2_tok, num_beams):
    """Left padding, the KV cache and prompt stripping change nothing: prompts of 1 to 15
    words in one batch give exactly the answers each gives alone (greedy and beam)."""
    batched = generate(model, gpt2_tok, PROMPTS, 8, batch_size=len(PROMPTS), num_beams=num_beams)
    alone = [_one_at_a_time(model, gpt2_tok, p, 8, num_beams) for p in PROMPTS]
    assert batched == alone
    assert not any(a.startswith("Unscramble") for a in batched)  # the prompt is never echoed


@pytest.mark.parametrize("num_beams", [1, 2])
def test_an_answer_ends_at_eos_or_its_stop_marker_and_is_flagged_when_cut_at_the_budget(model, gpt2_tok, num_beams):
    from tuneline.generation import answer

    free, _, ended = answer(model, gpt2_tok, PROMPTS, 8, len(PROMPTS), num_beams, stop=None)
    for text, done in zip(free, ended):  # the random model runs on: cut at 8 tokens, unless EOS came first
        again, _, _ = answer(model, gpt2_tok, [PROMPTS[free.index(text)]], 16, 1, num_beams, stop=None)
        assert done == (again[0] == text)  # given more budget, a cut answer goes on; an ended one does not
    marker = free[0].split()[0]  # a word it does write
    _, _, ended = answer(model, gpt2_tok, PROMPTS[:1], 8, 1, num_beams, stop=marker)
    assert ended == [True]


def test_prompt_lookup_guesses_change_no_token_and_save_forwards(model, gpt2_tok):
    """Guessed tokens are kept only where the model itself predicts them: with lookup on,
    every prompt's answer is still its one-at-a-time greedy answer; on tiny GPT-2, which
    repeats itself (its own earlier tokens are good guesses), in fewer forwards."""
    calls, forward = [], model.forward

    def counting(*args, **kw):
        calls.append(kw["input_ids"].shape[1])
        return forward(*args, **kw)

    model.forward = counting
    try:
        plain = generate(model, gpt2_tok, PROMPTS, 12, batch_size=len(PROMPTS))
        n_plain, calls[:] = len(calls), []
        guessed = generate(model, gpt2_tok, PROMPTS, 12, batch_size=len(PROMPTS), lookup=3)
    finally:
        del model.forward
    assert guessed == plain == [_one_at_a_time(model, gpt2_tok, p, 12) for p in PROMPTS]
    if model.config.model_type == "gpt2":
        assert max(calls[1:]) > 1 and len(calls) < n_plain  # guesses were fed, and some kept


def test_generation_stops_once_the_answer_line_is_complete(gpt2_tok):
    """Greedy rows stop at the answer's first newline (a leading one does not count): the
    rest would be cut anyway. The batched == one-at-a-time test above covers the outputs."""
    from tuneline.generation import answer_complete

    answers = [gpt2_tok(r, add_special_tokens=False)["input_ids"] for r in (" a b\nmore", "\n a b", " a b")]
    assert [answer_complete(gpt2_tok, a, "\n") for a in answers] == [True, False, False]


def test_a_finished_row_leaves_the_batch_and_every_row_keeps_its_greedy_tokens(model, gpt2_tok):
    """Rows end at different steps (here: at their first token divisible by 5, or EOS). Each
    row's tokens are generate's greedy tokens for that prompt alone, cut at the same point,
    and each step computes only the rows still answering."""
    from tuneline.generation import greedy

    def done(ids):
        return ids[-1] % 5 == 0

    gpt2_tok.padding_side = "left"
    enc = gpt2_tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    sizes, forward = [], model.forward

    def recording(*args, **kw):
        sizes.append(kw["input_ids"].shape[0])
        return forward(*args, **kw)

    model.forward = recording
    try:
        got = greedy(model, enc["input_ids"], enc["attention_mask"], 12, gpt2_tok.eos_token_id, done)
    finally:
        del model.forward
    for prompt, ids in zip(PROMPTS, got):
        alone = gpt2_tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            full = model.generate(**alone, max_new_tokens=12, do_sample=False, pad_token_id=gpt2_tok.eos_token_id)
        want = []
        for t in full[0, alone["input_ids"].shape[1] :].tolist():
            want.append(t)
            if t == gpt2_tok.eos_token_id or done(want):
                break
        assert ids == want
    lengths = sorted(len(ids) for ids in got)
    assert lengths[0] < lengths[-1]  # the rows did end at different steps
    assert sizes[0] == len(PROMPTS) and sizes == sorted(sizes, reverse=True) and sizes[-1] < len(PROMPTS)


def _rows(n=6):
    return [
        {"target": " ".join(p.split("\n")[0].split()[1:]), "source": p.split("\n")[0].split(": ")[1]}
        for p in PROMPTS[:n]
    ]


def test_example_losses_equal_each_example_scored_alone(tiny_gpt2, gpt2_tok):
    params = recipes.build("descramble", ["model.name=tiny-gpt2", "tokenize.max_length=32"])
    rows = _rows()
    nll, n = example_nll(tiny_gpt2, gpt2_tok, rows, params)  # packed several to a row
    for r, got, count in zip(rows, nll, n):
        prompt, answer = tasks.render(tasks.TASKS["descramble"], r, [])
        p = gpt2_tok(prompt, add_special_tokens=False)["input_ids"]
        a = gpt2_tok(answer, add_special_tokens=False)["input_ids"] + [gpt2_tok.eos_token_id]
        with torch.no_grad():
            logp = tiny_gpt2(torch.tensor([p + a])).logits[0].log_softmax(-1)
        want = -sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(a))
        assert count == len(a) and got == pytest.approx(want, rel=1e-4)
    ev = {"nll": nll, "tokens": n, "outputs": [""] * len(rows), "generation_s": 0.0}
    assert metrics_of(ev, rows, params)["perplexity"] == pytest.approx(math.exp(sum(nll) / sum(n)))


def test_label_scoring_picks_the_most_likely_verbalised_label(tiny_gpt2, gpt2_tok):
    labels = ["sadness", "joy", "love", "anger", "fear", "surprise"]
    params = recipes.build("emotion", ["model.name=tiny-gpt2"])
    rows = [{"text": t, "label": "joy"} for t in ("i feel great", "i am so scared of the dark", "what a day")]
    picked = score_labels(tiny_gpt2, gpt2_tok, rows, params)
    for r, got in zip(rows, picked):
        prompt = tasks.TASKS["classify"].prompt(r, labels)
        p = gpt2_tok(prompt, add_special_tokens=False)["input_ids"]

        def logp(label, p=p):
            a = gpt2_tok(" " + label, add_special_tokens=False)["input_ids"] + [gpt2_tok.eos_token_id]
            with torch.no_grad():
                lp = tiny_gpt2(torch.tensor([p + a])).logits[0].log_softmax(-1)
            return sum(float(lp[len(p) - 1 + i, t]) for i, t in enumerate(a))

        assert got == max(labels, key=logp)


def test_each_branch_scored_from_its_prompts_cache_equals_the_branch_scored_alone(model, gpt2_tok):
    # Label answers (or a reference answer) scored after the prompt's cache must get the
    # log-probability of prompt + branch read as one sequence, on GPT-2 and Llama positions
    # alike, with left padding in the batch; and decoding from the cache afterwards must
    # give the tokens it gives without the branches.
    from tuneline.generation import decode, prefill, score_branches

    eos = gpt2_tok.eos_token_id
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    branches = [
        [gpt2_tok(a)["input_ids"] + [eos] for a in answers]
        for answers in (
            [" the cat sat", " sat", " a much longer answer than the others here"],
            [" hills", " hills"],  # the same branch twice, and a short prompt
            [" joy", " sadness", " surprise", " love"],
        )
    ]
    gpt2_tok.padding_side = "left"
    enc = gpt2_tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert not enc["attention_mask"].all()  # the batch is padded
    state = prefill(model, enc["input_ids"], enc["attention_mask"])
    got = score_branches(model, state, enc["attention_mask"], branches, eos)
    for prompt, bs, lps in zip(prompts, branches, got):
        prefix = gpt2_tok(prompt, add_special_tokens=False)["input_ids"]
        for branch, lp in zip(bs, lps):
            with torch.no_grad():
                alone = model(torch.tensor([prefix + branch])).logits[0].log_softmax(-1)
            want = sum(float(alone[len(prefix) - 1 + i, t]) for i, t in enumerate(branch))
            assert lp == pytest.approx(want, abs=1e-4)
    after = decode(model, state, enc["attention_mask"], 6, eos, lambda ids: False)
    fresh = prefill(model, enc["input_ids"], enc["attention_mask"])
    assert after == decode(model, fresh, enc["attention_mask"], 6, eos, lambda ids: False)


@pytest.mark.parametrize("recipe", ["descramble", "emotion"])
def test_evaluation_reads_answer_losses_from_the_generation_pass_as_packed_scoring_gives_them(
    tiny_gpt2, gpt2_tok, recipe
):
    """evaluate_model takes each answer's loss from the prompt's cache (no second pass over
    the prompts); the figures are those of scoring whole examples, packed."""
    params = recipes.build(recipe, ["model.name=tiny-gpt2", "tokenize.max_length=64", "evaluate.max_new_tokens=3"])
    if recipe == "emotion":
        rows = [
            {"text": t, "label": lab} for t, lab in (("i feel great", "joy"), ("so sad", "sadness"), ("grr", "anger"))
        ]
    else:
        rows = _rows()
    ev = evaluate_model(tiny_gpt2, gpt2_tok, rows, params)
    nll, n = example_nll(tiny_gpt2, gpt2_tok, rows, params)
    assert ev["tokens"] == n
    assert ev["nll"] == pytest.approx(nll, rel=1e-4)


def test_classification_reports_free_generation_and_scoring(tiny_gpt2, gpt2_tok):
    params = recipes.build("emotion", ["model.name=tiny-gpt2", "evaluate.max_new_tokens=4"])
    rows = [{"text": t, "label": lab} for t, lab in (("i feel great", "joy"), ("so sad", "sadness"), ("grr", "anger"))]
    ev = evaluate_model(tiny_gpt2, gpt2_tok, rows, params)
    m = metrics_of(ev, rows, params)
    assert set(tasks.CLASS_METRICS) <= set(m) and len(ev["scored"]) == 3
    assert all(s in params.prepare.labels for s in ev["scored"])  # scoring always gives a label
    assert m["unparseable_rate"] == 1.0  # a random model never starts its answer with one


def test_any_model_on_a_file_it_has_never_seen(tmp_path, model_cache):
    data = tmp_path / "mine.jsonl"
    data.write_text(
        "".join(
            json.dumps({"target": s}) + "\n"
            for s in (
                "The quick brown fox jumps over the lazy dog.",
                "A stitch in time saves nine stitches later.",
                "The quick brown fox jumps over the lazy dog.",
            )
        )
    )  # the duplicate is dropped, as prepare does
    params = recipes.build("descramble", ["model.name=tiny-gpt2", "evaluate.max_new_tokens=8"])
    result = evaluate_file("tiny-gpt2", params, str(data))
    assert result["n_examples"] == 2 and result["data"]["sha256"]
    assert list(result["metrics"]) == [*tasks.TASKS["descramble"].metrics, "unterminated_rate", "generation_s"]
    assert sorted(result["predictions"][0]["prompt"].split()[1:-1]) == sorted(
        result["predictions"][0]["target"].split()
    )


@pytest.mark.parametrize("task", ["descramble", "classify"])
def test_base_vs_tuned_figure_has_a_panel_per_metric_and_the_primary_ci(task):
    """The PNG evaluate logs to MLflow: scales differ (chrF 0-100, exact match 0-1), hence a
    panel per metric; the primary metric's panel names the paired 95% CI of the delta."""
    import io

    from components.evaluate import base_vs_tuned_figure

    names = tasks.TASKS[task].metrics
    base = {m: 0.1 * (i + 1) for i, m in enumerate(names)}
    tuned = {m: 0.2 * (i + 1) for i, m in enumerate(names)}
    primary = names[0]
    results = {
        "base": base | {"generation_s": 3.0},
        "tuned": tuned | {"generation_s": 2.0},
        "delta": {m: tuned[m] - base[m] for m in names},
        "n_examples": 8,
        "tuned_vs_base": {"metric": primary, "delta": 0.1, "ci_low": 0.05, "ci_high": 0.15},
        "base_prompting": "few_shot",
    }
    fig = base_vs_tuned_figure(results)
    assert "best prompting: few_shot" in fig.get_suptitle()  # which way of prompting the base won
    assert fig.axes[0].get_xticklabels()[0].get_text().startswith("base (few_shot)")
    assert [ax.get_title().split("\n")[0].split(" (")[0] for ax in fig.axes] == list(names)
    assert "95% CI [+0.05, +0.15]" in fig.axes[0].get_title()
    assert all("CI" not in ax.get_title() for ax in fig.axes[1:])
    assert all(len(ax.patches) == 2 for ax in fig.axes)  # base and tuned bars
    png = io.BytesIO()
    fig.savefig(png, format="png")
    assert png.getvalue().startswith(b"\x89PNG\r\n\x1a\n")


def test_rows_are_fitted_to_the_positions_with_the_real_answer_budget(gpt2_tok):
    """A row is kept when its prompt plus the answer budget generation will use (the longest
    reference + 8, capped by evaluate.max_new_tokens) fits, however large the cap; when no
    row fits, the message says which setting to change."""
    rows = _rows()
    task = tasks.TASKS["descramble"]
    _, spans = encode_batch(gpt2_tok, rows, task, [])
    prompts = [answer_start(s) for s in spans]
    budget = max(len(gpt2_tok(t)["input_ids"]) for t in prompts_and_targets(task, rows, [])[1]) + 8
    params = recipes.build("descramble", ["model.name=tiny-gpt2", "evaluate.max_new_tokens=1000"])
    assert fit_rows(gpt2_tok, rows, params, max(prompts) + budget) == (rows, 0)  # the cap alone would fit none
    kept, dropped = fit_rows(gpt2_tok, rows, params, max(prompts) + budget - 1)  # the longest prompt has no room
    assert dropped == prompts.count(max(prompts)) and len(kept) == len(rows) - dropped
    # The examples fit, but no prompt leaves room for the budget.
    with pytest.raises(
        TunelineError, match=rf"no example leaves room.*Fix: lower evaluate.max_new_tokens to at most {budget - 1}$"
    ):
        fit_rows(gpt2_tok, rows, params, min(prompts) + budget - 1)
    with pytest.raises(
        TunelineError, match=r"^validate: all 6 examples are longer than the model's 4 positions.*Fix: shorten"
    ):
        fit_rows(gpt2_tok, rows, params, 4, "validate")


def test_cached_base_scores_are_not_reused_for_new_weights_under_the_same_folder(local_model):
    from tuneline import evaluation, recipes
    from tuneline.prompting import Prompting

    folder = local_model
    params = recipes.build(None, [f"model.name={folder}"], False, None)
    rows = [{"source": "cat the sat", "target": "the cat sat"}]
    old = evaluation._base_cache_key(rows, params, Prompting("plain"))
    assert evaluation._base_cache_key(rows, params, Prompting("plain")) == old
    (folder / "model.safetensors").write_bytes(b"new weights")
    assert evaluation._base_cache_key(rows, params, Prompting("plain")) != old
