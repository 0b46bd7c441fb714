"""The acceptance rule itself (METHODS.md §3), on planted paired predictions: no model needed."""

import numpy as np
import pytest

from vepatch.data import ImageSet
from vepatch.guard import Suite, detectable_drop_pp, drop_p, judge
from vepatch.recipe import GuardSpec
from vepatch.runtime.passes import Predictions


def paired(n: int, lost: int, gained: int) -> tuple[Predictions, Predictions]:
    """`n` images of one class; the candidate breaks `lost` the baseline had right and fixes `gained`."""
    labels = np.zeros(n, dtype=np.int64)
    before = np.zeros(n, dtype=np.int64)
    before[:gained] = 1  # wrong before, the candidate fixes them
    after = before.copy()
    after[:gained] = 0
    after[gained:gained + lost] = 1  # right before, the candidate breaks them
    return Predictions(labels, before), Predictions(labels, after)


def verdict(n: int, lost: int, gained: int, bar: float = 1.0, **spec):
    suite = Suite("g", "guard", ImageSet("g", "", ["a", "b"], []), None, bar)
    b, a = paired(n, lost, gained)
    return judge([suite], {"g": b}, {"g": a}, GuardSpec(max_mean_drop_pp=100.0, **spec), 1.0).suites[0]


def test_the_test_is_one_sided_and_asks_only_whether_it_got_worse():
    b, a = paired(100, lost=5, gained=0)
    assert drop_p(b.correct, a.correct) == pytest.approx(0.5 ** 5)
    assert drop_p(a.correct, b.correct) == 1.0  # gaining 5 is never a "drop"


def test_the_smallest_detectable_drop_follows_the_suite_size():
    assert detectable_drop_pp(30, 0.05) == pytest.approx(100 * 5 / 30)  # 0.5**5 = 0.031 < 0.05, 0.5**4 is not
    assert detectable_drop_pp(1000, 0.05) == pytest.approx(0.5)
    assert detectable_drop_pp(4, 0.05) == float("inf")


def test_a_small_suite_that_loses_four_images_fails():
    """The defect: 4 lost and 0 gained on 30 images (-13.3 pp, two-sided p = 0.125) passed."""
    s = verdict(30, lost=4, gained=0)
    assert not s.passed
    assert "raw drop decides" in s.why
    assert s.detectable_pp == pytest.approx(100 * 5 / 30)


def test_lenient_small_suites_keep_the_test():
    assert verdict(30, lost=4, gained=0, small_suites="lenient").passed


def test_a_large_suite_judges_a_drop_by_the_test():
    assert verdict(1000, lost=12, gained=0).passed is False  # -1.2 pp, p = 0.5**12
    noisy = verdict(1000, lost=30, gained=18)  # -1.2 pp, but 30 vs 18 losses is not significant
    assert noisy.passed and "within noise" in noisy.why


def test_a_drop_within_the_bar_passes_whatever_the_size():
    assert verdict(30, lost=1, gained=1).passed
    assert verdict(1000, lost=5, gained=0).passed  # -0.5 pp < 1 pp


def test_a_drop_exactly_at_the_bar_passes():
    assert verdict(200, lost=2, gained=0).passed  # -1.0 pp is not more than 1.0 pp


def test_a_mean_drop_exactly_at_the_mean_bar_passes():
    """3 of 600 lost is -0.5 pp; in floating point the mean came out as -0.50000000000001 and
    refused a stream's first round for 'mean guard drop -0.50 pp > 0.50 pp allowed'."""
    suite = Suite("g", "guard", ImageSet("g", "", ["a", "b"], []), None, 1.0)
    b, a = paired(600, lost=3, gained=0)
    result = judge([suite], {"g": b}, {"g": a}, GuardSpec(max_mean_drop_pp=0.5), 1.0)
    assert result.mean_guard_change_pp == pytest.approx(-0.5) and result.passed, result.why
    b, a = paired(600, lost=4, gained=0)  # -0.67 pp: beyond it
    assert not judge([suite], {"g": b}, {"g": a}, GuardSpec(max_mean_drop_pp=0.5), 1.0).passed


def test_a_suite_the_baseline_reads_at_chance_is_not_judged():
    """10 classes, baseline right on 10%: its changes are noise and never block a candidate."""
    n, k = 200, 10
    labels = np.arange(n) % k
    before = labels.copy()
    before[20:] = (labels[20:] + 1) % k  # 20 of 200 right: 10%, chance for 10 classes
    after = before.copy()
    after[:10] = (labels[:10] + 1) % k  # 10 of those lost: -5 pp
    suite = Suite("digits", "guard", ImageSet("digits", "", [str(c) for c in range(k)], []), None, 1.0)
    result = judge([suite], {"digits": Predictions(labels, before)}, {"digits": Predictions(labels, after)},
                   GuardSpec(), 1.0)
    assert result.passed and "at chance" in result.suites[0].why and result.mean_guard_change_pp == 0.0


def test_an_earlier_versions_holdout_is_judged_however_low_its_accuracy():
    """Two classes at 50%: chance for a recipe suite, but a version's holdout guards a fix."""
    labels = np.array([0, 1] * 15)
    before = labels.copy()
    before[:15] = 1 - labels[:15]  # 15 of 30 right
    after = before.copy()
    after[15:17] = 1 - labels[15:17]  # 2 more lost: -6.7 pp
    for holdout, judged in ((True, True), (False, False)):
        suite = Suite("v1-holdout", "guard", ImageSet("v1", "", ["a", "b"], []), None, 1.0, holdout=holdout)
        result = judge([suite], {"v1-holdout": Predictions(labels, before)}, {"v1-holdout": Predictions(labels, after)},
                       GuardSpec(max_mean_drop_pp=100.0), 1.0)
        assert result.passed is not judged



def test_with_the_base_model_s_predictions_small_drops_cannot_add_up():
    """Night after night -0.5 pp passes a 1 pp bar; against the base model the sum is judged."""
    suite = Suite("g", "guard", ImageSet("g", "", ["a", "b"], []), None, 1.0)
    spec = GuardSpec(max_mean_drop_pp=100.0)

    def nights(earlier: int, tonight: int):
        """The base right on all 600; the baseline lost `earlier`, tonight's candidate `tonight` more."""
        base, baseline = paired(600, lost=earlier, gained=0)
        preds = baseline.preds.copy()
        preds[earlier:earlier + tonight] = 1
        return base, baseline, Predictions(baseline.labels, preds)

    base, baseline, cand = nights(6, 3)  # -0.5 pp tonight, -1.5 pp since the base (p = 0.5**9)
    assert judge([suite], {"g": baseline}, {"g": cand}, spec, 1.0).passed
    result = judge([suite], {"g": baseline}, {"g": cand}, spec, 1.0, root={"g": base})
    assert not result.passed and result.suites[0].why.startswith("since the base model: drop -1.5 pp")
    base, baseline, cand = nights(3, 2)  # -0.83 pp since the base: within the bar
    assert judge([suite], {"g": baseline}, {"g": cand}, spec, 1.0, root={"g": base}).passed
