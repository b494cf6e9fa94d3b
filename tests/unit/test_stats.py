"""The report's statistics on planted numbers: Holm by hand, Δm, the Pareto front with ties,
fair ranking on common pairings, and the paired bootstrap against what theory says its spread
must be (the delta method for a ratio of paired accuracies; Fisher's approximation for Pearson)."""
import math

import numpy as np
import pytest

from cluster.report import stats


def test_holm_by_hand():
    adjusted = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.2, "e": None})
    # sorted 0.01, 0.03, 0.04, 0.2 times 4, 3, 2, 1 -> 0.04, 0.09, 0.08 (made monotone: 0.09), 0.2
    assert adjusted == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.2})
    assert "e" not in adjusted


def test_delta_m_and_relative_change():
    assert stats.relative_change(0.55, 0.5) == pytest.approx(10.0)
    assert stats.relative_change(0.3, 0.0) is None
    assert stats.delta_m([10.0, -5.0]) == pytest.approx(2.5)
    assert stats.delta_m([10.0, None]) is None and stats.delta_m([]) is None


def test_pareto_front_on_planted_points():
    points = {"A": (1, 5), "B": (3, 3), "C": (2, 2), "D": (5, 1), "E": (3, 3), "F": (0, 5), "G": (5, 0.5)}
    # C is dominated by B; F by A (same y, less x); G by D; B and E tie, so neither dominates the other.
    assert stats.pareto_front(points) == ["A", "B", "E", "D"]
    assert stats.pareto_front({"only": (-1, -1)}) == ["only"]


def test_compare_on_common_ranks_on_shared_pairings_only():
    values = {"addition": {"p1": 6.0, "p2": -4.0}, "PCGrad": {"p1": 3.0}}
    fair = stats.compare_on_common(values)
    # Over its own pairings PCGrad's mean (+3) beats addition's (+1); where both ran, addition wins.
    assert fair["common"] == ["p1"] and [m for m, _ in fair["ranked"]] == ["addition", "PCGrad"]
    assert fair["ranked"][0][1] == pytest.approx(6.0) and fair["lacking"] == {"PCGrad": ["p2"]}
    disjoint = stats.compare_on_common({"a": {"p1": 1.0}, "b": {"p2": 2.0}})
    assert disjoint["common"] == [] and disjoint["ranked"] == []


def classes(gold, correct, k=5):
    """Predictions right exactly where ``correct`` is."""
    return np.where(correct, gold, (gold + 1) % k)


def test_paired_bootstrap_of_a_planted_change_has_the_spread_theory_gives():
    rng = np.random.default_rng(0)
    n = 2000
    gold = rng.integers(0, 5, n)
    base_right = np.zeros(n, bool)
    base_right[rng.permutation(n)[:1400]] = True                       # baseline 0.70
    trial_right = base_right.copy()
    trial_right[rng.permutation(np.flatnonzero(~base_right))[:200]] = True   # trial 0.80, right wherever base is
    base, trial = classes(gold, base_right), classes(gold, trial_right)
    assert stats.score("acc", gold, base) == pytest.approx(0.7)
    assert stats.score("acc", gold, trial) == pytest.approx(0.8)
    ids = tuple(str(i) for i in range(n))
    [samples] = stats.paired_changes([{"stream": "sst", "metric": "acc", "ids": ids, "gold": gold,
                                       "a": ("trial", trial), "b": ("base", base)}])
    true = 100 * (0.8 - 0.7) / 0.7
    lo, hi = stats.percentile_interval(samples)
    assert lo < true < hi and lo > 0
    # Delta method for r = T/B - 1 with paired indicator rows (p11 = P(both right) = 0.7).
    pt, pb, p11 = 0.8, 0.7, 0.7
    var = (pt * (1 - pt) / pb ** 2 + pt ** 2 * pb * (1 - pb) / pb ** 4 - 2 * pt * (p11 - pt * pb) / pb ** 3) / n
    assert samples.std() == pytest.approx(100 * math.sqrt(var), rel=0.1)
    assert stats.bootstrap_p(true, samples) < 1e-6
    # Same rows, same resamples: the result does not depend on when or beside what it is computed.
    [again, _] = stats.paired_changes([{"stream": "sst", "metric": "acc", "ids": ids, "gold": gold,
                                        "a": ("trial", trial), "b": ("base", base)},
                                       {"stream": "sst", "metric": "acc", "ids": ids, "gold": gold,
                                        "a": ("other", base), "b": ("base", base)}])
    np.testing.assert_array_equal(again, samples)


def test_paired_bootstrap_of_a_null_change_includes_zero():
    rng = np.random.default_rng(1)
    n = 2000
    gold = rng.integers(0, 2, n)
    base_right = rng.permutation(n) < 1500                               # 0.75
    trial_right = base_right.copy()                                       # 0.75 too, on other rows:
    trial_right[np.flatnonzero(base_right)[:150]] = False                 # 150 rows only the baseline gets
    trial_right[np.flatnonzero(~base_right)[:150]] = True                 # and 150 only the trial gets
    samples = stats.relative_change_samples(*stats.bootstrap_scores(
        "acc", gold, np.stack([classes(gold, trial_right, 2), classes(gold, base_right, 2)]), seed=[7]).T)
    lo, hi = stats.percentile_interval(samples)
    assert lo < 0 < hi and stats.bootstrap_p(0.0, samples) == 1.0
    assert 0.5 < stats.empirical_p(samples) <= 1.0
    identical = stats.relative_change_samples(*stats.bootstrap_scores(
        "acc", gold, np.stack([classes(gold, base_right, 2)] * 2), seed=[7]).T)
    assert not identical.any() and stats.bootstrap_p(0.0, identical) == 1.0


def test_pearson_bootstrap_matches_fisher():
    rng = np.random.default_rng(2)
    n = 1000
    gold = rng.uniform(0, 5, n)
    pred = gold + rng.normal(0, 1.5, n)
    r = stats.score("pearson", gold, pred)
    assert r == pytest.approx(np.corrcoef(gold, pred)[0, 1])
    scores = stats.bootstrap_scores("pearson", gold, pred[None, :], resamples=2000, seed=[3])[:, 0]
    assert scores.mean() == pytest.approx(r, abs=0.01)
    assert scores.std() == pytest.approx((1 - r ** 2) / math.sqrt(n - 3), rel=0.15)     # Fisher's z, back-transformed
    assert np.allclose(stats.bootstrap_scores("pearson", gold, gold[None, :], resamples=50, seed=[3]), 1.0)


def test_align_rows_by_id():
    a = (["x", "y", "z"], np.array([1.0, 0.0, 1.0]), np.array([1.0, 1.0, 0.0]))
    b = (["z", "x"], np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    ids, pa, pb, gold = stats.align_rows(a, b)
    assert ids == ("z", "x") and pa.tolist() == [1.0, 1.0] and pb.tolist() == [0.0, 1.0] and gold.tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="gold"):
        stats.align_rows(a, (["z", "x"], np.array([0.0, 1.0]), np.array([1.0, 1.0])))
    with pytest.raises(ValueError, match="share 0 rows"):
        stats.align_rows(a, (["q"], np.array([0.0]), np.array([0.0])))


def test_summarise_seeds_uses_the_t_test_and_one_seed_the_bootstrap():
    rng = np.random.default_rng(4)
    samples = {0: rng.normal(5, 1, 500), 1: rng.normal(5.2, 1, 500), 2: rng.normal(4.9, 1, 500)}
    s = stats.summarise({0: 5.0, 1: 5.2, 2: 4.9}, samples)
    assert s.test == "t-test" and s.p == pytest.approx(stats.ttest_p([5.0, 5.2, 4.9]))
    pooled = np.mean([samples[0], samples[1], samples[2]], axis=0)
    assert (s.lo, s.hi) == pytest.approx(stats.percentile_interval(pooled))
    one = stats.summarise({0: 5.0}, {0: samples[0]})
    assert one.test == "bootstrap" and one.p == pytest.approx(stats.bootstrap_p(5.0, samples[0]))
    assert stats.summarise({0: 5.0}, {0: None}).p is None
