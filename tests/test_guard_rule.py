"""The acceptance rule itself (acceptance.py, bounds.py), on planted paired predictions: no model needed."""

import math

import numpy as np
import pytest

from vepatch import bounds
from vepatch.data import ImageSet
from vepatch.guard import UNGUARDED, Suite, choose, judge, level_of
from vepatch.recipe import GuardSpec
from vepatch.records import StrengthResult
from vepatch.runtime.passes import Predictions


def paired(n: int, lost: int, gained: int, right: int | None = None) -> tuple[Predictions, Predictions]:
    """`n` images of one class; the candidate breaks `lost` the baseline had right and fixes
    `gained`; `right` (default: all but the gained) is how many the baseline has right."""
    labels = np.zeros(n, dtype=np.int64)
    before = np.ones(n, dtype=np.int64)  # wrong
    right = n - gained if right is None else right
    before[gained:gained + right] = 0  # right before
    after = before.copy()
    after[:gained] = 0  # fixed
    after[gained:gained + lost] = 1  # broken
    return Predictions(labels, before), Predictions(labels, after)


def guard_suite(name: str = "g", bar: float = 1.0, holdout: bool = False) -> Suite:
    return Suite(name, "guard", ImageSet(name, "", ["a", "b"], []), None, bar, holdout=holdout)


def verdict(n: int, lost: int, gained: int, bar: float = 1.0, holdout: bool = False, **spec):
    suite = guard_suite(bar=bar, holdout=holdout)
    b, a = paired(n, lost, gained)
    spec = {"max_mean_drop_pp": 100.0, "strengths": [1.0], "allow_unguarded": True, **spec}
    return judge([suite], {"g": b}, {"g": a}, GuardSpec(**spec), 1.0).suites[0]


def target(n: int, gained: int, lost: int = 0, right: int = 0, **spec):
    suite = Suite("target-holdout", "target", ImageSet("t", "", ["a", "b"], []), None, 0.0)
    b, a = paired(n, lost, gained, right=right)
    spec = {"strengths": [1.0], "allow_unguarded": True, **spec}
    return judge([suite], {"target-holdout": b}, {"target-holdout": a}, GuardSpec(**spec), 1.0).suites[0]


# --- the bound ----------------------------------------------------------------------------


def test_with_no_image_changed_the_bound_is_z_squared_over_n_plus_z_squared():
    z2 = bounds.z_of(0.05) ** 2
    for n in (30, 200, 600):
        assert bounds.drop_upper(bounds.Discordant(n, 0, 0), 0.05) == pytest.approx(z2 / (n + z2), rel=1e-6)
    assert bounds.fewest_images(0.01, 0.05) == 268  # the smallest suite that can certify 1 pp at all


def test_the_bound_and_the_non_inferiority_p_say_the_same():
    for lost, gained in ((0, 0), (5, 2), (30, 18), (12, 0), (3, 9)):
        c = bounds.Discordant(600, lost, gained)
        for bar in (0.005, 0.01, 0.02, 0.05):
            assert (bounds.drop_upper(c, 0.05) <= bar) == (bounds.noninferiority_p(c, bar) < 0.05)


def test_the_bounds_cover_the_true_drop_at_their_level():
    """Simulated matched pairs: the one-sided 95% upper bound lies below the true drop at most
    about 5% of the time, on small and large suites and churns."""
    rng = np.random.default_rng(0)
    for n, p_lost, p_gained in ((60, 0.05, 0.02), (300, 0.03, 0.03), (600, 0.04, 0.015)):
        true = p_lost - p_gained
        counts = rng.multinomial(n, [p_lost, p_gained, 1 - p_lost - p_gained], size=2000)
        misses = sum(bounds.drop_upper(bounds.Discordant(n, int(lo), int(ga)), 0.05) < true for lo, ga, _ in counts)
        assert misses / 2000 < 0.065, (n, misses)


# --- guard suites ---------------------------------------------------------------------------


def test_a_drop_that_is_not_significant_is_not_kept():
    """The defect: -2.0 pp (30 lost, 18 gained on 600) passed a 1 pp bar as 'within noise'."""
    s = verdict(600, lost=30, gained=18)
    assert not s.passed and not s.certified
    assert "could be as bad as" in s.why and s.bound_pp < -3.0


def test_a_large_suite_with_a_small_change_is_certified():
    s = verdict(1000, lost=3, gained=1)  # -0.2 pp
    assert s.passed and s.certified and -1.0 <= s.bound_pp < -0.2 and "kept" in s.why


def test_a_suite_that_could_certify_its_bar_says_how_many_images_it_needs():
    s = verdict(600, lost=15, gained=15)  # no net change, but 5% churn: the bound is about -1.6 pp
    assert not s.passed and s.needed_images > 600 and f"{s.needed_images:,} images" in s.why
    b, a = paired(s.needed_images, lost=15 * s.needed_images // 600, gained=15 * s.needed_images // 600)
    bigger = judge([guard_suite()], {"g": b}, {"g": a}, GuardSpec(max_mean_drop_pp=100, strengths=[1.0]), 1.0).suites[0]
    assert bigger.certified  # the size it named does certify the same churn


def test_a_small_suite_is_uncertified_and_vetoes_only_on_evidence():
    """200 images can never certify 1 pp (268 needed): lenient names it uncertified and refuses
    only a drop shown beyond the bar; strict refuses it."""
    quiet = verdict(200, lost=1, gained=0)
    assert quiet.passed and not quiet.certified and "uncertified" in quiet.why
    assert not verdict(200, lost=1, gained=0, small_suites="strict").passed
    loud = verdict(200, lost=20, gained=0)  # -10 pp: shown beyond 1 pp
    assert not loud.passed and "shown beyond the bar" in loud.why


def test_one_image_of_a_nine_image_holdout_does_not_veto():
    """The defect: losing 1 of a 9-image earlier holdout was -11.1 pp > 1 pp, refused."""
    assert verdict(9, lost=1, gained=0, holdout=True).passed


def test_a_one_image_loss_in_a_pooled_history_is_judged_by_the_pool():
    """Many nights' holdouts pooled (1,000 images): one image lost keeps the bound within 1 pp;
    a real drop in the pool still refuses."""
    kept = verdict(1000, lost=1, gained=0, holdout=True)
    assert kept.passed and kept.certified
    assert not verdict(1000, lost=25, gained=0, holdout=True).passed  # -2.5 pp


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
                   GuardSpec(allow_unguarded=True), 1.0)
    assert result.passed and not result.suites[0].judged and result.mean_guard_change_pp == 0.0


def test_nothing_guarded_refuses_unless_the_recipe_allows_it():
    """The defect: a recipe whose suites were all absent or at chance promoted with nothing guarded."""
    t = Suite("target-holdout", "target", ImageSet("t", "", ["a", "b"], []), None, 0.0)
    b, a = paired(100, lost=0, gained=60, right=0)
    preds = ({"target-holdout": b}, {"target-holdout": a})
    refused = judge([t], *preds, GuardSpec(strengths=[1.0]), 1.0)
    assert not refused.passed and UNGUARDED in refused.why
    assert judge([t], *preds, GuardSpec(strengths=[1.0], allow_unguarded=True), 1.0).passed
    holdout_only = judge([t, guard_suite("history", holdout=True)], {**preds[0], "history": paired(50, 0, 0)[0]},
                         {**preds[1], "history": paired(50, 0, 0)[1]}, GuardSpec(strengths=[1.0]), 1.0)
    assert not holdout_only.passed  # earlier holdouts are not a prior task


def test_the_mean_of_small_suites_can_certify_what_none_can_alone():
    suites = [guard_suite(f"g{i}") for i in range(3)]
    b, a = paired(200, lost=0, gained=0)
    base, cand = ({s.name: b for s in suites}, {s.name: a for s in suites})
    result = judge(suites, base, cand, GuardSpec(strengths=[1.0]), 1.0)
    assert result.passed and not any(s.certified for s in result.suites)
    assert -1.0 < result.mean_bound_pp < 0 and "could be as bad as" in result.mean_why
    b, a = paired(200, lost=4, gained=0)  # -2 pp on each: the mean's bound is beyond 1 pp
    result = judge(suites, {s.name: b for s in suites}, {s.name: a for s in suites}, GuardSpec(strengths=[1.0]), 1.0)
    assert not result.passed and "mean guard change" in result.why


def test_with_the_base_model_s_predictions_small_drops_cannot_add_up():
    """Night after night a small drop passes; against the base model the sum is judged."""
    suite = guard_suite()
    spec = GuardSpec(max_mean_drop_pp=100.0, strengths=[1.0])

    def nights(earlier: int, tonight: int):
        """The base right on all 2000; the baseline lost `earlier`, tonight's candidate `tonight` more."""
        base, baseline = paired(2000, lost=earlier, gained=0)
        preds = baseline.preds.copy()
        preds[earlier:earlier + tonight] = 1
        return base, baseline, Predictions(baseline.labels, preds)

    base, baseline, cand = nights(30, 4)  # -0.2 pp tonight, -1.7 pp since the base
    assert judge([suite], {"g": baseline}, {"g": cand}, spec, 1.0).passed
    result = judge([suite], {"g": baseline}, {"g": cand}, spec, 1.0, root={"g": base})
    assert not result.passed and result.suites[0].why.startswith("since the base model: could be as bad as")


# --- the target ----------------------------------------------------------------------------


def test_a_one_image_gain_on_a_nine_image_holdout_does_not_pass_the_target():
    """The defect: +11 pp (1 of 9 fixed) passed the +2 pp bar by its raw size."""
    s = target(9, gained=1)
    assert not s.passed and "not shown" in s.why
    assert target(9, gained=6).passed  # 6 fixed, none broken: p = 1/64 < 0.05
    assert not target(9, gained=6, strengths=[0.25, 0.5, 0.75, 1.0]).passed  # at 0.05/4 it needs 7


def test_a_recipe_asking_no_gain_tests_none():
    assert target(9, gained=0, min_target_gain_pp=0.0).passed


def test_the_target_bound_is_the_least_gain():
    s = target(180, gained=100, lost=5, right=20)
    assert s.passed and s.certified and 0 < s.bound_pp < s.change_pp


# --- the strength search ------------------------------------------------------------------


def test_each_strength_is_tested_at_alpha_over_the_strengths():
    assert level_of(GuardSpec(alpha=0.05, strengths=[0.25, 0.5, 0.75, 1.0])) == pytest.approx(0.0125)
    assert level_of(GuardSpec(alpha=0.05, strengths=[1.0])) == pytest.approx(0.05)


def test_the_largest_passing_strength_is_chosen():
    def trial(strength, passed):
        return StrengthResult(strength, [], 0.0, passed, "")

    trials = [trial(1.0, False), trial(0.75, True), trial(0.5, True)]  # 0.5 may gain more: the order decides
    assert choose(trials).strength == 0.75
    assert choose([trial(1.0, False)]) is None


def test_every_bound_is_finite_and_in_range():
    for n, lost, gained in ((1, 0, 0), (1, 1, 0), (1, 0, 1), (5, 5, 0), (5, 0, 5), (100, 50, 50)):
        c = bounds.Discordant(n, lost, gained)
        lo, up = bounds.drop_lower(c, 0.05), bounds.drop_upper(c, 0.05)
        assert -1.0 <= lo <= c.drop <= up <= 1.0 and math.isfinite(lo) and math.isfinite(up)


def test_an_accepted_verdict_names_the_suites_it_could_not_certify():
    from vepatch.cli.render import verdict_lines
    from vepatch.records import GuardReport

    small = verdict(200, lost=1, gained=0)  # passes, uncertified
    trial = StrengthResult(1.0, [small], 0.0, True, "all checks pass")
    report = GuardReport("c", "base", "fp", True, 1.0, [trial], "accepted at strength 1.0", {}, "now", version="v1")
    assert "g uncertified" in verdict_lines(report)[0].plain
    certified = StrengthResult(1.0, [verdict(1000, lost=1, gained=1)], 0.0, True, "all checks pass")
    assert verdict_lines(GuardReport("c", "base", "fp", True, 1.0, [certified], "", {}, "now", version="v1"))[0].plain \
        .endswith("guards kept")
