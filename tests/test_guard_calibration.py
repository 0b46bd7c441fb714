"""The guard's promise, checked by simulation (calibration.py): planted candidates through the
guard's own strength search. Small synthetic suites, so it runs in seconds."""

import pytest

from vepatch import calibration
from vepatch.recipe import GuardSpec, GuardSuite


@pytest.fixture(scope="module")
def rows():
    target = calibration.synthetic("target", 90, 0.15, classes=3, seed=1)
    guard = calibration.synthetic("guard", 600, 0.7, seed=2)
    spec = GuardSpec(allow_unguarded=True, suites=[GuardSuite(path="g", name="guard", max_drop_pp=2.0)])
    return calibration.run(target, guard, spec, gain=0.15, churn=0.02, trials=150)


def test_a_candidate_that_drops_a_suite_by_twice_its_bar_is_refused(rows):
    twice = next(r for r in rows if r.scenario == "drops the suite by 2x its bar")
    assert twice.accepted <= 0.05 * twice.trials and twice.holds
    at_bar = next(r for r in rows if r.scenario == "drops the suite by its bar")
    assert at_bar.holds


def test_a_harmless_candidate_is_accepted_as_the_exact_calculation_predicts(rows):
    alone, search = [r for r in rows if r.claim.startswith("(b)")]
    assert 0.2 < alone.predicted < 0.98  # the scenario is neither certain nor hopeless
    assert alone.low <= alone.predicted <= alone.high
    assert search.holds


def test_a_candidate_with_no_effect_is_accepted_at_most_alpha_over_the_search(rows):
    none = next(r for r in rows if r.claim.startswith("(c)"))
    assert none.accepted <= 0.05 * none.trials + 2 and none.holds


def test_the_exact_pass_probability_matches_a_direct_count():
    """exact_pass sums binomial probabilities over the rule's verdicts: on a tiny suite the same
    figure comes from enumerating every outcome of every image."""
    import itertools

    import numpy as np

    from vepatch import acceptance

    o = calibration.synthetic("g", 6, 0.5, classes=2, seed=3)
    spec = GuardSpec(strengths=[1.0], small_suites="strict")
    p_break, p_fix = calibration.flip_rates(o, 0.0, 0.4)
    right = o.right
    total = 0.0
    for flips in itertools.product([0, 1], repeat=6):
        f = np.array(flips, dtype=bool)
        p = np.prod(np.where(right, np.where(f, p_break, 1 - p_break), np.where(f, p_fix, 1 - p_fix)))
        b, a = calibration._counts(6, int(right.sum()), int((f & right).sum()), int((f & ~right).sum()))
        total += p * acceptance.judge_drop("g", b, a, 50.0, spec, 0.05)[0].passed
    assert calibration.exact_pass(o, "guard", 50.0, 0.0, 0.4, spec, 0.05) == pytest.approx(total, rel=1e-6)
