"""Calibration of the guard by simulation: does the verdict's promise hold? (README, "Guard
statistics"; `examples/guard_calibration.py` writes the table.)

A candidate is planted on a suite's real or synthetic baseline predictions: every image draws
one uniform number per trial, and at strength λ an image the baseline has right breaks when
its number is below p_break(λ), one it has wrong is fixed when below p_fix(λ): nested across
strengths as a real λ·Δ is. The guard's own code judges it (`guard.judge` over the strength
search from the largest down, stopping at the first pass), and the acceptance rate is counted
with its Clopper-Pearson interval. Three claims are checked:
  (a) a candidate whose true drop on a guard suite is twice its bar at every strength is
      refused at least 1 - alpha of the time (and one at the bar itself, at least as often);
  (b) one with no true drop and a real target gain is accepted as often as the exact
      calculation predicts for the first strength tried (at least);
  (c) a candidate with no effect at all is accepted at most alpha of the time over the whole
      strength search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy.stats import beta, binom

from . import acceptance
from .data import ImageSet
from .guard import Suite, choose, judge, level_of
from .recipe import GuardSpec
from .runtime.passes import Predictions


@dataclass(frozen=True)
class Outcomes:
    """A suite's labels and the baseline's predictions (real ones, or made by `synthetic`)."""

    name: str
    labels: np.ndarray
    preds: np.ndarray
    classes: int

    @property
    def right(self) -> np.ndarray:
        return self.labels == self.preds


def synthetic(name: str, n: int, accuracy: float, classes: int = 10, seed: int = 0) -> Outcomes:
    """`n` images, the baseline right on round(n * accuracy) of them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    preds = labels.copy()
    wrong = rng.permutation(n)[: n - round(n * accuracy)]
    preds[wrong] = (labels[wrong] + 1 + rng.integers(0, classes - 1, len(wrong))) % classes
    return Outcomes(name, labels, preds, classes)


@dataclass(frozen=True)
class Effect:
    """A planted change as it is at λ = 1: the true drop and the churn (share of images whose
    outcome flips either way), both fractions; `scales`: smaller strengths do proportionally
    less (else the same at every strength)."""

    drop: float = 0.0
    churn: float = 0.0
    scales: bool = True

    def at(self, strength: float) -> tuple[float, float]:
        k = strength if self.scales else 1.0
        return self.drop * k, self.churn * k


def flip_rates(o: Outcomes, drop: float, churn: float) -> tuple[float, float]:
    """P(break | right) and P(fix | wrong) that give this expected drop and churn."""
    acc = float(o.right.mean())
    churn = max(churn, abs(drop))
    p_break = (churn + drop) / (2 * acc) if acc else 0.0
    p_fix = (churn - drop) / (2 * (1 - acc)) if acc < 1 else 0.0
    if not (0 <= p_break <= 1 and 0 <= p_fix <= 1):
        raise ValueError(f"{o.name}: a drop of {drop:.3f} at churn {churn:.3f} is impossible at accuracy {acc:.3f}")
    return p_break, p_fix


def planted(o: Outcomes, u: np.ndarray, drop: float, churn: float) -> Predictions:
    p_break, p_fix = flip_rates(o, drop, churn)
    preds = o.preds.copy()
    right = o.right
    broken = right & (u < p_break)
    preds[broken] = (o.labels[broken] + 1) % o.classes
    fixed = ~right & (u < p_fix)
    preds[fixed] = o.labels[fixed]
    return Predictions(o.labels, preds)


def suite_of(o: Outcomes, role: str, bar: float) -> Suite:
    return Suite(o.name, role, ImageSet(o.name, "", [str(k) for k in range(o.classes)], []), None, bar)


def accepted(target: Outcomes, guards: list[Outcomes], t_effect: Effect, g_effects: list[Effect], spec: GuardSpec,
             rng: np.random.Generator) -> float | None:
    """One planted candidate through the guard's strength search: the strength promoted, or None."""
    suites = [suite_of(target, "target", 0.0)] + [suite_of(g, "guard", s.max_drop_pp) for g, s in zip(guards, spec.suites)]
    outcomes = [target, *guards]
    effects = [t_effect, *g_effects]
    draws = [rng.random(len(o.labels)) for o in outcomes]
    base = {o.name: Predictions(o.labels, o.preds) for o in outcomes}
    trials = []
    for strength in sorted(spec.strengths, reverse=True):
        cand = {o.name: planted(o, u, *e.at(strength)) for o, u, e in zip(outcomes, draws, effects)}
        trials.append(judge(suites, base, cand, spec, strength))
        if trials[-1].passed:
            break
    best = choose(trials)
    return best.strength if best else None


@dataclass(frozen=True)
class Row:
    claim: str
    scenario: str
    trials: int
    accepted: int
    low: float  # Clopper-Pearson 95% interval of the acceptance rate
    high: float
    predicted: float  # the design's figure the rate is held to (a bound, or the exact rate at the first strength)
    holds: bool

    @property
    def rate(self) -> float:
        return self.accepted / self.trials


def clopper_pearson(k: int, n: int) -> tuple[float, float]:
    lo = 0.0 if k == 0 else float(beta.ppf(0.025, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(0.975, k + 1, n - k))
    return lo, hi


def exact_pass(o: Outcomes, role: str, bar: float, drop: float, churn: float, spec: GuardSpec, level: float) -> float:
    """The exact probability that one suite passes at one strength: the sum, over every count of
    broken and fixed images, of its binomial probability times whether the rule passes it."""
    right = int(o.right.sum())
    wrong = len(o.labels) - right
    p_break, p_fix = flip_rates(o, drop, churn)
    lost_p = binom.pmf(np.arange(right + 1), right, p_break)
    gained_p = binom.pmf(np.arange(wrong + 1), wrong, p_fix)
    total = 0.0
    for lost in np.nonzero(lost_p > 1e-10)[0]:
        for gained in np.nonzero(gained_p > 1e-10)[0]:
            b, a = _counts(len(o.labels), right, int(lost), int(gained))
            if role == "target":
                ok = acceptance.judge_target(o.name, b, a, spec, level).passed
            else:
                ok = acceptance.judge_drop(o.name, b, a, bar, spec, level)[0].passed
            total += lost_p[lost] * gained_p[gained] * ok
    return float(total)


def _counts(n: int, right: int, lost: int, gained: int) -> tuple[Predictions, Predictions]:
    labels = np.zeros(n, dtype=np.int64)
    before = np.ones(n, dtype=np.int64)
    before[:right] = 0
    after = before.copy()
    after[:lost] = 1
    after[right:right + gained] = 0
    return Predictions(labels, before), Predictions(labels, after)


def run(target: Outcomes, guard: Outcomes, spec: GuardSpec, gain: float, churn: float, trials: int,
        seed: int = 0) -> list[Row]:
    """The three claims on one target and one guard suite (held to spec.suites[0]'s bar):
    `gain` is the real target gain at λ 1 (a fraction), `churn` the guard suite's churn at λ 1.
    With one suite the mean is that suite: its bar is held to the suite's own."""
    spec = replace(spec, max_mean_drop_pp=spec.suites[0].max_drop_pp)
    bar = spec.suites[0].max_drop_pp / 100
    alpha, level = spec.alpha, level_of(spec)
    rows = []

    def count(t_effect: Effect, g_effect: Effect, s: GuardSpec = spec, k: int = 0) -> int:
        rng = np.random.default_rng([seed, k])
        return sum(accepted(target, [guard], t_effect, [g_effect], s, rng) is not None for _ in range(trials))

    real = Effect(-gain, gain)  # fixes only
    for k, (name, drop) in enumerate((("drops the suite by 2x its bar", 2 * bar), ("drops the suite by its bar", bar))):
        n = count(real, Effect(drop, churn + drop, scales=False), k=k + 1)
        lo, hi = clopper_pearson(n, trials)
        rows.append(Row("(a) refused >= 1 - alpha", name, trials, n, lo, hi, alpha, n / trials <= alpha + _slack(trials)))
    one = replace(spec, strengths=[max(spec.strengths)])
    predicted = (exact_pass(target, "target", 0.0, -gain, gain, one, level_of(one))
                 * exact_pass(guard, "guard", spec.suites[0].max_drop_pp, 0.0, churn, one, level_of(one)))
    n = count(real, Effect(0.0, churn), one, k=3)
    lo, hi = clopper_pearson(n, trials)
    rows.append(Row("(b) accepted as predicted", f"no drop, gain {100 * gain:.0f} pp, λ 1 alone", trials, n, lo, hi, predicted,
                    lo <= predicted <= hi))
    n = count(real, Effect(0.0, churn), k=4)
    lo, hi = clopper_pearson(n, trials)
    exact_first = (exact_pass(target, "target", 0.0, -gain, gain, spec, level)
                   * exact_pass(guard, "guard", spec.suites[0].max_drop_pp, 0.0, churn, spec, level))
    rows.append(Row("(b) accepted as predicted", f"no drop, gain {100 * gain:.0f} pp, the search", trials, n, lo, hi,
                    exact_first, hi >= exact_first))
    n = count(Effect(0.0, 0.1), Effect(0.0, churn), k=5)
    lo, hi = clopper_pearson(n, trials)
    rows.append(Row("(c) accepted <= alpha", "no effect (the target churns 10% both ways)", trials, n, lo, hi, alpha,
                    n / trials <= alpha + _slack(trials)))
    return rows


def _slack(trials: int) -> float:
    """Sampling slack on a simulated rate: two binomial standard errors at 0.05."""
    return 2 * math.sqrt(0.05 * 0.95 / trials)
