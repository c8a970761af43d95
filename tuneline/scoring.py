"""Every metric as a sum of per-example statistics, so one piece of code both scores a model
and resamples it for confidence intervals and significance tests.

A metric is `Stat(values, fn)`: `values` (n, k) holds each example's sufficient statistics
and `fn` turns their (k,) sum into the metric. Means are (x, 1) pairs; BLEU and chrF use
sacrebleu's own sentence statistics (n-gram matches and totals), the way sacrebleu's
paired bootstrap does; macro-F1 sums per-label tp/fp/fn; perplexity sums (nll, tokens).
Resampling examples is then a matrix product of bootstrap counts with `values`.

`ev` (one model's evaluation) is {"outputs": [str], "nll": [float], "tokens": [int],
"scored": [str] | None}: generated answers, summed answer-token loss and answer tokens
per unit (an example; a concatenated block for pretraining), and the label that
log-likelihood scoring picked (classify/entail).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Metrics that are a mean of a 0/1 per-example outcome: McNemar's test applies.
BINARY = {"exact_match", "multiset_rate", "accuracy", "scored_accuracy", "unparseable_rate", "unterminated_rate"}
# Metrics on a 0-100 scale (sacrebleu's); the others that are neither 0/1 nor perplexity
# (rouge_l, macro_f1) run from 0 to 1.
PERCENT = {"chrf", "bleu"}
# Metrics where lower is better (the gate and the deltas need to know).
LOWER_IS_BETTER = {"perplexity", "unparseable_rate", "unterminated_rate"}
# The share of answers cut at evaluate.max_new_tokens, never ending by themselves (EOS or
# the task's stop): scored for every generating task, a default guardrail of the gate.
UNTERMINATED = "unterminated_rate"


@dataclass(frozen=True)
class Stat:
    values: np.ndarray  # (n, k) per-example sufficient statistics
    fn: Callable[[np.ndarray], float]  # (k,) summed statistics -> metric value

    def value(self) -> float:
        return self.fn(self.values.sum(0))


def mean(x) -> Stat:
    """The mean of per-example values (a 0/1 outcome, a score)."""
    x = np.asarray(x, dtype=float)
    return Stat(np.stack([x, np.ones_like(x)], 1), lambda s: float(s[0] / s[1]) if s[1] else math.nan)


def macro_f1(preds: list[str | None], gold: list[str], labels: list[str]) -> Stat:
    """Per example, per label: (tp, fp, fn). F1 of a label with none of them is 0, as
    scikit-learn's f1_score(average='macro', zero_division=0)."""
    L = len(labels)
    v = np.zeros((len(gold), 3 * L))
    for i, (p, g) in enumerate(zip(preds, gold)):
        for j, label in enumerate(labels):
            v[i, 3 * j] = p == label and g == label
            v[i, 3 * j + 1] = p == label and g != label
            v[i, 3 * j + 2] = p != label and g == label

    def fn(s: np.ndarray) -> float:
        tp, fp, fn_ = s[0::3], s[1::3], s[2::3]
        den = 2 * tp + fp + fn_
        return float(np.mean(np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0)))

    return Stat(v, fn)


def sacrebleu(name: str, outputs: list[str], targets: list[str]) -> Stat:
    from sacrebleu.metrics import BLEU, CHRF

    metric = BLEU() if name == "bleu" else CHRF()
    # The same private API sacrebleu's own paired bootstrap (significance.py) uses.
    values = np.asarray(metric._extract_corpus_statistics(outputs, [targets]), dtype=float)
    return Stat(values, lambda s: float(metric._compute_score_from_stats(s).score))


def perplexity(ev: dict) -> Stat:
    """exp(summed answer-token loss / answer tokens), from each unit's (nll, tokens)."""
    nll, n = np.asarray(ev["nll"], dtype=float), np.asarray(ev["tokens"], dtype=float)
    return Stat(np.stack([nll, n], 1), lambda s: math.exp(s[0] / s[1]) if s[1] else math.nan)


def stat(task, metric: str, rows: list[dict], ev: dict, labels: list[str]) -> Stat:
    """The per-example statistics of `metric` for one model's evaluation `ev` on `rows`:
    perplexity for every task, the unterminated rate for every generating one, the rest as
    the task scores them (`Task.score`; `accuracy[joy]`: a labelled task's accuracy on one
    label's examples)."""
    if metric == "perplexity":
        return perplexity(ev)
    if metric == UNTERMINATED and task.generates:
        if "ended" not in ev:
            raise KeyError(f"this evaluation does not record whether answers ended ({UNTERMINATED})")
        return mean([not e for e in ev["ended"]])
    if metric.split("[", 1)[0] not in task.metrics or task.score is None:
        raise ValueError(f"no metric '{metric}' for task '{task.name}'")
    return task.score(metric, rows, ev, labels)


def metric_names(task) -> tuple[str, ...]:
    """What `metrics` reports: the task's metrics, and the unterminated rate where it generates."""
    return (*task.metrics, UNTERMINATED) if task.generates else task.metrics


def metrics(task, rows: list[dict], ev: dict, labels: list[str]) -> dict[str, float]:
    names = [m for m in metric_names(task) if m != UNTERMINATED or "ended" in ev]  # older records lack it
    return {m: stat(task, m, rows, ev, labels).value() for m in names}


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of a challenger `a` with a reference `b` on the same examples."""

    metric: str
    a: float  # challenger's value
    b: float  # reference's value
    delta: float  # a - b
    ci_low: float  # 95% paired bootstrap interval of a - b
    ci_high: float
    p_value: float  # one-sided: H0 "a is no better than b"
    test: str  # 'bootstrap' or 'mcnemar'
    n: int  # examples (units) compared

    def improvement(self) -> float:
        """delta in the metric's good direction (positive = a is better)."""
        return -self.delta if self.metric in LOWER_IS_BETTER else self.delta


def compare(
    a: Stat, b: Stat, metric: str, test: str = "bootstrap", n_boot: int = 1000, seed: int = 0, margin: float = 0.0
) -> Comparison:
    """Paired bootstrap (Koehn 2004): resample examples with replacement, the same draw for
    both models; the 2.5/97.5 percentiles of the resampled differences are the CI. The
    p-value shifts the resampled differences to the null (Berg-Kirkpatrick et al. 2012):
    p = P(delta* - delta >= delta), one-sided toward "a is better". With a `margin` it is
    a non-inferiority test (the gate's guardrails): H0 "a is worse than b by margin or
    more", p = P(delta* - delta >= delta + margin), in the metric's good direction.
    McNemar's exact test uses only the examples where exactly one of the two is right
    (0/1 metrics; superiority only)."""
    n = len(a.values)
    if len(b.values) != n:
        raise ValueError(f"paired comparison needs the same examples ({n} vs {len(b.values)})")
    va, vb = a.value(), b.value()
    delta = va - vb
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))  # (B, n) example indices
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)  # (B, n) times each is drawn
    deltas = np.array([a.fn(s) for s in counts @ a.values]) - np.array([b.fn(s) for s in counts @ b.values])
    if not (math.isfinite(delta) and np.isfinite(deltas).all()):
        return Comparison(metric, va, vb, delta, math.nan, math.nan, math.nan, test, n)
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    if test == "mcnemar" and not margin:
        p = mcnemar(a.values[:, 0], b.values[:, 0], lower_is_better=sign < 0)
    else:
        p = (1 + int(np.sum(sign * (deltas - delta) >= sign * delta + margin))) / (n_boot + 1)
    return Comparison(metric, va, vb, delta, float(lo), float(hi), float(p), test, n)


def mcnemar(a: np.ndarray, b: np.ndarray, lower_is_better: bool = False) -> float:
    """One-sided exact McNemar p-value that `a` is right more often than `b` (0/1 arrays;
    for a lower-is-better rate, 'right' is 0)."""
    from scipy.stats import binomtest

    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if lower_is_better:
        a, b = ~a, ~b
    wins, losses = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue) if wins + losses else 1.0


def holm(pvalues: list[float], alpha: float) -> list[bool]:
    """Holm's step-down procedure: which hypotheses are rejected at family-wise level alpha.
    The j-th smallest p-value (0-based) must be at most alpha / (m - j), and so must every
    smaller one."""
    order = sorted(range(len(pvalues)), key=lambda i: (math.isnan(pvalues[i]), pvalues[i]))  # NaN last
    rejected = [False] * len(pvalues)
    for j, i in enumerate(order):
        if not pvalues[i] <= alpha / (len(pvalues) - j):  # NaN never rejects
            break
        rejected[i] = True
    return rejected


def spent_alpha(alpha: float, k: int) -> float:
    """The level of the k-th (1-based) gate decision on the same test examples: alpha·6/(π²k²).
    The levels sum to alpha over any number of decisions, so the chance that any of them
    promotes a model that is no better stays under alpha, however often a schedule re-tests."""
    return alpha * 6 / (math.pi**2 * k**2)


def detectable(ci_low: float, ci_high: float, level: float, power: float = 0.8) -> float:
    """The smallest true effect a one-sided test at `level` finds with `power`, given the
    spread of the bootstrap deltas (its 95% interval's width / 3.92 is their standard error)."""
    from scipy.stats import norm

    if level >= 1:  # no test: nothing to detect
        return math.nan
    se = (ci_high - ci_low) / (2 * norm.ppf(0.975))
    return float((norm.ppf(1 - level) + norm.ppf(power)) * se)
