"""Metrics from per-example statistics, paired bootstrap and McNemar."""

import math
import random

import numpy as np
import pytest
import sacrebleu
from sklearn.metrics import f1_score

from tuneline import scoring, tasks

DESCRAMBLE = tasks.TASKS["descramble"]
CLASSIFY = tasks.TASKS["classify"]
LABELS = ["joy", "sadness", "anger"]
WORDS = "the cat sat on a mat while dogs ran over hills near old red barns".split()


def _sentences(rng, n):
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def _descramble(n=60, seed=0):
    rng = random.Random(seed)
    targets = _sentences(rng, n)
    rows = [{"target": t, "source": " ".join(sorted(t.split()))} for t in targets]
    outputs = [t if rng.random() < 0.3 else " ".join(rng.sample(t.split(), len(t.split()))) for t in targets]
    return rows, {"outputs": outputs}


def test_corpus_metrics_from_statistics_equal_sacrebleu():
    rows, ev = _descramble()
    refs, outs = [r["target"] for r in rows], ev["outputs"]
    got = {m: scoring.stat(DESCRAMBLE, m, rows, ev, []).value() for m in ("bleu", "chrf", "exact_match")}
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outs, [refs]).score, abs=1e-9)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(outs, [refs]).score, abs=1e-9)
    assert got["exact_match"] == pytest.approx(np.mean([o == t for o, t in zip(outs, refs)]))


def test_macro_f1_equals_scikit_learn_with_unparseable_answers():
    rng = random.Random(1)
    gold = [rng.choice(LABELS) for _ in range(50)]
    outputs = [rng.choice(LABELS + ["no idea", "Joy!"]) for _ in range(50)]
    rows = [{"text": "t", "label": g} for g in gold]
    ev = {"outputs": outputs, "scored": [rng.choice(LABELS) for _ in range(50)]}
    parsed = [tasks.parse_label(o, LABELS) or "<unparseable>" for o in outputs]
    assert scoring.stat(CLASSIFY, "macro_f1", rows, ev, LABELS).value() == pytest.approx(
        f1_score(gold, parsed, labels=LABELS, average="macro", zero_division=0)
    )
    assert scoring.stat(CLASSIFY, "scored_macro_f1", rows, ev, LABELS).value() == pytest.approx(
        f1_score(gold, ev["scored"], labels=LABELS, average="macro", zero_division=0)
    )
    assert scoring.stat(CLASSIFY, "unparseable_rate", rows, ev, LABELS).value() == pytest.approx(
        np.mean([p == "<unparseable>" for p in parsed])
    )


def test_perplexity_is_token_weighted():
    ev = {"nll": [2.0, 30.0], "tokens": [1, 10]}  # a short easy example, a long hard one
    assert scoring.stat(DESCRAMBLE, "perplexity", [], ev, []).value() == pytest.approx(math.exp(32 / 11))


def test_a_model_against_itself_is_not_significant():
    rows, ev = _descramble()
    s = scoring.stat(DESCRAMBLE, "chrf", rows, ev, [])
    c = scoring.compare(s, s, "chrf", n_boot=500, seed=0)
    assert c.delta == 0 and c.ci_low == 0 and c.ci_high == 0 and c.p_value == 1.0


def test_a_clearly_better_model_is_significant_and_its_ci_excludes_zero():
    rows, ev = _descramble(n=80)
    perfect = {"outputs": [r["target"] for r in rows]}
    a, b = (scoring.stat(DESCRAMBLE, "chrf", rows, e, []) for e in (perfect, ev))
    c = scoring.compare(a, b, "chrf", n_boot=1000, seed=0)
    assert c.delta > 0 and 0 < c.ci_low <= c.delta <= c.ci_high and c.p_value < 0.01
    worse = scoring.compare(b, a, "chrf", n_boot=1000, seed=0)
    assert worse.improvement() < 0 and worse.p_value > 0.5  # one-sided: worse is never significant


def test_lower_perplexity_counts_as_the_improvement():
    n = 40
    better = {"nll": [1.0] * n, "tokens": [5] * n}
    worse = {"nll": [3.0 + (i % 3) for i in range(n)], "tokens": [5] * n}
    a, b = (scoring.stat(DESCRAMBLE, "perplexity", [], e, []) for e in (better, worse))
    c = scoring.compare(a, b, "perplexity", n_boot=500, seed=0)
    assert c.delta < 0 and c.improvement() > 0 and c.p_value < 0.01


def test_the_bootstrap_is_seeded():
    rows, ev = _descramble(seed=3)
    other = _descramble(seed=4)[1]
    a, b = (scoring.stat(DESCRAMBLE, "bleu", rows, e, []) for e in (ev, other))
    assert scoring.compare(a, b, "bleu", seed=7) == scoring.compare(a, b, "bleu", seed=7)


def test_mcnemar_counts_only_discordant_pairs():
    a = np.array([1] * 10 + [0] * 5 + [1] * 20)
    b = np.array([0] * 10 + [0] * 5 + [1] * 20)  # a wins 10 times, never loses
    assert scoring.mcnemar(a, b) == pytest.approx(0.5**10)
    assert scoring.mcnemar(a, a) == 1.0
    # for a rate where lower is better, having fewer 1s wins
    assert scoring.mcnemar(b, a, lower_is_better=True) == pytest.approx(0.5**10)


def test_a_nan_metric_gives_a_nan_comparison():
    ev = {"nll": [math.nan, 1.0], "tokens": [2, 2]}
    ok = {"nll": [1.0, 1.0], "tokens": [2, 2]}
    a, b = (scoring.stat(DESCRAMBLE, "perplexity", [], e, []) for e in (ev, ok))
    c = scoring.compare(a, b, "perplexity", n_boot=100)
    assert math.isnan(c.p_value) and math.isnan(c.ci_low)


def test_a_labels_accuracy_counts_only_that_labels_examples():
    rows = [{"text": "t", "label": g} for g in ("joy", "joy", "fear", "fear", "fear")]
    ev = {"outputs": ["joy", "fear", "fear", "joy", "nonsense"], "scored": ["joy", "joy", "fear", "fear", "fear"]}
    task, labels = tasks.TASKS["classify"], ["joy", "fear"]
    assert scoring.stat(task, "accuracy[joy]", rows, ev, labels).value() == 0.5
    assert scoring.stat(task, "accuracy[fear]", rows, ev, labels).value() == pytest.approx(1 / 3)
    assert scoring.stat(task, "scored_accuracy[fear]", rows, ev, labels).value() == 1.0


def test_the_unterminated_rate_is_the_share_of_answers_cut_at_the_budget():
    rows = [{"source": "a b", "target": "b a"}] * 4
    ev = {
        "outputs": ["b a"] * 4,
        "nll": [1.0] * 4,
        "tokens": [2] * 4,
        "scored": None,
        "ended": [True, False, True, True],
    }
    got = scoring.metrics(tasks.TASKS["descramble"], rows, ev, [])
    assert got["unterminated_rate"] == 0.25
    older = {k: v for k, v in ev.items() if k != "ended"}  # recorded before tuneline kept it
    assert "unterminated_rate" not in scoring.metrics(tasks.TASKS["descramble"], rows, older, [])
