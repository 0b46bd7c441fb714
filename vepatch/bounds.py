"""The guard's arithmetic: one-sided confidence bounds on a paired change, so that a verdict
says how bad a change could be, not only whether a test noticed it.

Right/wrong outcomes of the same images under two models are matched pairs: only the
discordant ones carry information (`lost`: right before, wrong after; `gained`: the reverse).
The drop is d = (lost - gained) / n. Its bounds come from inverting **Tango's score test**
for the difference of paired proportions (Tango 1998, Stat Med 17:891): the score statistic
uses the variance under the restricted maximum-likelihood estimate at each candidate d, so
the bound stays inside [-1, 1], is defined with zero discordant pairs (n images that all
agree still leave a bound of z²/(n+z²)), and keeps close to its nominal coverage on the small
discordant counts a guard sees (Newcombe 1998 compares ten intervals; Tango's and Newcombe's
hybrid are the two it recommends). Tango's is chosen because it is the inversion of one test
statistic, so "the bound is within the bar" and "the score test rejects a drop of the bar"
are the same statement, and the same statistic gives both sides and the sample size needed.

A suite of per-image values (caption likelihoods) is bounded by a seeded percentile
bootstrap of the mean paired difference. Several suites' mean is bounded by MOVER (Zou &
Donner 2008): the mean plus the root-sum-square of each suite's own half-width, over k.
`calibration.py` checks the coverage these promise by simulation (README, Guard statistics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest, norm

BOOTSTRAP_DRAWS = 2000


@dataclass(frozen=True)
class Discordant:
    """The paired outcomes of one suite: its size and the images the change lost and gained."""

    n: int
    lost: int
    gained: int

    @classmethod
    def of(cls, before: np.ndarray, after: np.ndarray) -> "Discordant":
        """From per-image correctness (bool arrays) before and after."""
        return cls(len(before), int((before & ~after).sum()), int((~before & after).sum()))

    @property
    def drop(self) -> float:
        """The observed drop, a fraction (negative: a gain)."""
        return (self.lost - self.gained) / self.n if self.n else 0.0

    @property
    def churn(self) -> float:
        """The share of images whose outcome changed either way."""
        return (self.lost + self.gained) / self.n if self.n else 0.0


def z_of(alpha: float) -> float:
    return float(norm.ppf(1.0 - alpha))


def _score(lost: float, gained: float, n: float, d: float) -> float:
    """Tango's score statistic for H0: drop = d (positive: the data show a larger drop)."""
    # the restricted MLE of P(gained) under drop = d solves 2n q² - w q - gained·d(1-d) = 0
    w = (lost + gained) + (lost - gained) * d - 2 * n * d
    q = (w + math.sqrt(max(0.0, w * w + 8 * n * gained * d * (1 - d)))) / (4 * n)
    var = n * (2 * q + d - d * d)
    num = lost - gained - n * d
    if var <= 0:
        return math.copysign(math.inf, num) if num else 0.0
    return num / math.sqrt(var)


def _solve(lost: float, gained: float, n: float, z: float, lo: float, hi: float) -> float:
    """The d in [lo, hi] where the score statistic crosses `z` (it falls as d rises)."""
    for _ in range(64):
        mid = (lo + hi) / 2
        if _score(lost, gained, n, mid) > z:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def drop_upper(c: Discordant, alpha: float) -> float:
    """The one-sided (1 - alpha) upper bound of the drop: it could be as bad as this (a fraction)."""
    return drop_upper_scaled(c.lost, c.gained, c.n, alpha) if c.n else 1.0


def drop_lower(c: Discordant, alpha: float) -> float:
    """The one-sided (1 - alpha) lower bound of the drop (negative: the change is at least this gain)."""
    if c.n == 0:
        return -1.0
    if alpha >= 0.5 or c.gained == c.n:
        return c.drop if c.gained < c.n else -1.0
    return _solve(c.lost, c.gained, c.n, z_of(alpha), -1.0, c.drop)


def noninferiority_p(c: Discordant, bar: float) -> float:
    """One-sided p of "the drop is at or beyond `bar`" by Tango's score statistic: below the
    level exactly when `drop_upper` is within the bar."""
    if c.n == 0:
        return 1.0
    return float(norm.cdf(_score(c.lost, c.gained, c.n, min(bar, 1.0))))


def gain_p(c: Discordant) -> float:
    """Exact one-sided McNemar test that the change gains more images than it loses (1.0 when
    nothing changed): the target's test. Exact, because a night's holdout has a handful of pairs."""
    if c.lost + c.gained == 0:
        return 1.0
    return float(binomtest(c.gained, c.lost + c.gained, 0.5, alternative="greater").pvalue)


def fewest_images(bar: float, alpha: float) -> int:
    """The smallest suite that can certify a drop under `bar` (a fraction) at all: with no image
    changing, the bound is z²/(n + z²)."""
    if alpha >= 0.5:  # z <= 0: the bound is the observed drop itself
        return 1
    z2 = z_of(alpha) ** 2
    return max(1, math.ceil(z2 / bar - z2)) if bar > 0 else math.inf


def images_to_certify(c: Discordant, bar: float, alpha: float) -> float:
    """How many images a suite needs for this change, at its observed churn and drop, to show a
    bound within `bar` (inf when the observed drop itself is at or beyond the bar: no size
    certifies it)."""
    return images_for(c.churn, c.drop, bar, alpha)


def images_for(churn: float, drop: float, bar: float, alpha: float) -> float:
    """The fewest images whose bound is within `bar` when a share `churn` of them change and the
    net drop is `drop` (fractions; counts need not be whole): the suite size a bar asks for."""
    if drop >= bar:
        return math.inf
    lost, gained = (churn + drop) / 2, (churn - drop) / 2

    def fits(n: float) -> bool:
        return drop_upper_scaled(lost * n, gained * n, n, alpha) <= bar

    hi = 1.0
    while not fits(hi):
        hi *= 2
        if hi > 1e9:
            return math.inf
    lo = hi / 2 if hi > 1 else 0.0
    while hi - lo > 1:
        mid = math.floor((lo + hi) / 2)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return float(math.ceil(hi))


def drop_upper_scaled(lost: float, gained: float, n: float, alpha: float) -> float:
    """`drop_upper` for counts that need not be whole (the same churn and drop on another suite
    size). A level of one half or more gives the observed drop itself."""
    if lost >= n:
        return 1.0
    if alpha >= 0.5:
        return (lost - gained) / n
    return _solve(lost, gained, n, -z_of(alpha), (lost - gained) / n, 1.0)


def mean_upper(drops: list[float], uppers: list[float]) -> float:
    """MOVER bound of the mean of independent suites' drops, from each one's own upper bound."""
    if not drops:
        return 0.0
    k = len(drops)
    return sum(drops) / k + math.sqrt(sum((u - d) ** 2 for d, u in zip(drops, uppers))) / k


def values_drop_bounds(before: np.ndarray, after: np.ndarray, alpha: float, seed: int = 0) -> tuple[float, float]:
    """Lower and upper one-sided (1 - alpha) bounds of the mean drop of paired per-image values
    (before - after), by a seeded percentile bootstrap: the same data give the same bounds."""
    diff = np.asarray(before, np.float64) - np.asarray(after, np.float64)
    if len(diff) == 0:
        return -1.0, 1.0
    if not diff.any():
        return 0.0, 0.0
    if alpha >= 0.5:
        return float(diff.mean()), float(diff.mean())
    means = bootstrap_means(diff, seed)
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def bootstrap_means(diff: np.ndarray, seed: int = 0) -> np.ndarray:
    """BOOTSTRAP_DRAWS means of `diff` resampled with replacement, from a fixed seed."""
    rng = np.random.default_rng(seed)
    return diff[rng.integers(0, len(diff), size=(BOOTSTRAP_DRAWS, len(diff)))].mean(axis=1)
