"""The acceptance rule for one suite, and for the mean over suites, at one strength (README,
"Guard statistics"). Everything is a one-sided test at the strength's `level`:

- the **target** passes when its gain reaches guard.min_target_gain_pp *and* an exact
  one-sided McNemar test shows a gain (p < level); a recipe whose min_target_gain_pp is 0 or
  less asks for no gain, and then nothing is tested;
- a **guard suite** passes when the upper bound of its drop (bounds.py) is within its bar:
  "could be as bad as -0.9 pp" against 1.0 allowed. Not seeing a drop is never enough;
- a suite **too small to certify its bar at any churn** (with no image changing, the bound is
  still z²/(n+z²): 268 images for 1 pp at 0.05) is *uncertified*. guard.small_suites says what
  that does: 'lenient' (the default) refuses only when its drop is shown beyond the bar (the
  lower bound), so one image of a 9-image holdout never vetoes; 'strict' refuses it outright;
- the **mean** over the recipe's judged suites is bounded by MOVER and held to
  guard.max_mean_drop_pp the same way.
A suite that could certify its bar but does not at this churn says how many images it would
need (bounds.images_to_certify).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import bounds
from .recipe import GuardSpec
from .records import SuiteResult
from .runtime.passes import Measured, Scores

CAPTION_FLOOR = 20  # a captioning row is bootstrapped: fewer images than this leave its bound uncertified


@dataclass(frozen=True)
class Change:
    """One suite's paired change, as fractions: the observed drop and its two one-sided bounds."""

    n: int
    drop: float
    upper: float
    lower: float
    p: float  # of "the drop is at or beyond the bar"
    floor: int  # the fewest images that can certify the bar at all
    needed: int  # images needed at this churn and drop (0: certified; -1: no size)


@dataclass(frozen=True)
class MeanResult:
    change_pp: float
    bound_pp: float
    passed: bool
    why: str


def pp(x: float) -> str:
    return f"{x:+.1f} pp"


def measure(b: Measured, a: Measured, bar: float, level: float, caption: bool = False) -> Change:
    """The change from b to a against a bar (fraction), at one-sided `level`."""
    if caption or isinstance(b, Scores):
        lower, upper = bounds.values_drop_bounds(b.values, a.values, level)
        diff = np.asarray(b.values, np.float64) - np.asarray(a.values, np.float64)
        drop = float(diff.mean()) if len(diff) else 0.0
        half = upper - drop
        needed = 0 if upper <= bar else (-1 if drop >= bar else math.ceil(len(diff) * (half / (bar - drop)) ** 2))
        return Change(len(diff), drop, upper, lower, float(np.mean(bounds.bootstrap_means(diff) >= bar)) if len(diff) else 1.0,
                      CAPTION_FLOOR, needed)
    c = bounds.Discordant.of(b.correct, a.correct)
    upper = bounds.drop_upper(c, level)
    needed = 0 if upper <= bar + 1e-12 else bounds.images_to_certify(c, bar, level)
    return Change(c.n, c.drop, upper, bounds.drop_lower(c, level), bounds.noninferiority_p(c, bar),
                  bounds.fewest_images(bar, level), -1 if needed == math.inf else int(needed))


def result(name: str, role: str, b: Measured, a: Measured, passed: bool, why: str, p: float, bound: float, bar: float,
           certified: bool, needed: int = 0, judged: bool = True) -> SuiteResult:
    return SuiteResult(name, role, len(b.labels), b.accuracy, a.accuracy, 100 * (a.accuracy - b.accuracy), p, passed, why,
                       bound, bar, certified, needed, judged)


def unjudged(name: str, b: Measured, a: Measured, why: str) -> SuiteResult:
    return result(name, "guard", b, a, True, why, 1.0, 0.0, 0.0, False, judged=False)


def judge_target(name: str, b: Measured, a: Measured, spec: GuardSpec, level: float) -> SuiteResult:
    """The target's gain must reach the required gain and be shown by the exact test at `level`."""
    c = bounds.Discordant.of(b.correct, a.correct)
    gain, p, least = -100 * c.drop, bounds.gain_p(c), -100 * bounds.drop_upper(c, level)
    need = spec.min_target_gain_pp
    tested = need > 0
    counts = f"{c.gained} fixed, {c.lost} broken"
    if gain < need - 1e-9:
        passed, why = False, f"gain {pp(gain)} < required {pp(need)} ({counts})"
    elif tested and not p < level:
        passed, why = False, f"gain {pp(gain)} not shown: p={p:.3g} ≥ {level:.3g} ({counts})"
    else:
        passed = True
        why = f"gain shown: p={p:.2g}, at least {pp(least)}" if tested else "no gain required (min_target_gain_pp ≤ 0)"
    return result(name, "target", b, a, passed, why, p, least, need, passed and tested)


def judge_drop(name: str, b: Measured, a: Measured, bar_pp: float, spec: GuardSpec, level: float,
               caption: bool = False) -> tuple[SuiteResult, Change]:
    """A guard suite passes when its drop's upper bound is within `bar_pp` (see the module doc)."""
    ch = measure(b, a, bar_pp / 100, level, caption)
    worst = f"could be as bad as {pp(-100 * ch.upper)}"
    n = len(b.labels)
    certified = ch.upper <= bar_pp / 100 + 1e-12 and n >= ch.floor  # (a classification suite under its floor cannot be)
    if certified:
        passed, why = True, f"kept: {worst} (≤ {bar_pp:g} pp)"
    elif n < ch.floor:
        shown = ch.lower > bar_pp / 100
        small = f"uncertified: {n} images cannot certify {bar_pp:g} pp at any churn (needs ≥ {ch.floor:,})"
        if spec.small_suites == "strict":
            passed, why = False, f"{small}; {worst}"
        else:
            passed = not shown
            why = f"{small}; {worst}" + ("; the drop is shown beyond the bar" if shown else "")
    else:
        passed = False
        more = (f"; at this churn certifying needs {ch.needed:,} images" if ch.needed > n else
                "; a drop this large is not certified at any size" if ch.needed < 0 else "")
        why = f"{worst} > {bar_pp:g} pp allowed{more}"
    return result(name, "guard", b, a, passed, why, ch.p, -100 * ch.upper, bar_pp, certified, ch.needed), ch


def judge_mean(changes: list[Change], spec: GuardSpec, level: float) -> MeanResult:
    """The mean drop over the recipe's judged suites, bounded by MOVER, within max_mean_drop_pp.
    Uncertifiable as a whole (with no image changing its bound would still exceed the bar):
    judged like a small suite."""
    if not changes:
        return MeanResult(0.0, 0.0, True, "")
    drops = [c.drop for c in changes]
    mean = sum(drops) / len(drops)
    upper = bounds.mean_upper(drops, [c.upper for c in changes])
    bar = spec.max_mean_drop_pp
    worst = f"mean guard change {pp(-100 * mean)}, could be as bad as {pp(-100 * upper)}"
    if upper <= bar / 100 + 1e-12:
        return MeanResult(-100 * mean, -100 * upper, True, f"{worst} (≤ {bar:g} pp)")
    # with no image changing, each suite's bound is z²/(n+z²): the mean's best case
    z2 = bounds.z_of(level) ** 2
    floor_bound = math.sqrt(sum((z2 / (c.n + z2)) ** 2 for c in changes)) / len(changes)
    if floor_bound > bar / 100 and spec.small_suites == "lenient":
        lower = mean - math.sqrt(sum((c.drop - c.lower) ** 2 for c in changes)) / len(changes)
        shown = lower > bar / 100
        return MeanResult(-100 * mean, -100 * upper, not shown,
                          f"{worst}: uncertified (these suites cannot certify a {bar:g} pp mean at any churn)"
                          + ("; the mean drop is shown beyond it" if shown else ""))
    return MeanResult(-100 * mean, -100 * upper, False, f"{worst} > {bar:g} pp allowed")
