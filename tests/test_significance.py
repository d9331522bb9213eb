from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from sepnet.evaluation.significance import bootstrap_ci, combine, min_cases, paired_test


def test_min_cases_from_the_exact_wilcoxon_bound():
    # all n differences of one sign: exact two-sided p = 2 / 2^n; 2/32 = 0.0625, 2/64 = 0.031
    assert min_cases(0.05) == 6
    assert min_cases(0.01) == 8  # 2/128 = 0.0156 >= 0.01, 2/256 = 0.0078


def test_exact_p_values_by_hand():
    # 12 distinct positive differences: p = 2 / 4096
    t = paired_test(np.arange(1, 13) * 0.01 + 0.5, np.full(12, 0.5), min_effect=0.005)
    assert t.p == pytest.approx(2 / 4096) and t.status == "held" and t.n == 12
    assert t.effect == pytest.approx(0.065)
    # ranks 1..6 with rank 1 negative: W+ = 20; sign patterns with W+ >= 20: all positive (21) and all but
    # rank 1 (20) -> one-sided 2/64, two-sided p = 4/64
    d = np.array([-1, 2, 3, 4, 5, 6]) * 0.01
    t = paired_test(d, np.zeros(6), min_effect=0.001)
    assert t.p == pytest.approx(4 / 64) and t.status == "inconclusive" and "p >= 0.05" in t.reason


def test_p_value_matches_scipy_on_hand_made_data():
    a = [0.81, 0.79, 0.85, 0.77, 0.90, 0.83, 0.80, 0.86, 0.78, 0.84]
    b = [0.80, 0.75, 0.86, 0.70, 0.85, 0.80, 0.81, 0.79, 0.74, 0.80]
    t = paired_test(a, b, min_effect=0.005)
    assert t.p == pytest.approx(stats.wilcoxon(np.subtract(a, b)).pvalue)
    assert t.status == "held"


def test_bootstrap_ci_is_seeded_and_agrees_with_scipy():
    rng = np.random.default_rng(1)
    d = rng.normal(0.02, 0.03, size=15)
    lo, hi = bootstrap_ci(d, n_boot=20000, seed=3)
    assert (lo, hi) == bootstrap_ci(d, n_boot=20000, seed=3)
    ref = stats.bootstrap((d,), np.mean, n_resamples=20000, method="percentile", random_state=0).confidence_interval
    assert lo == pytest.approx(ref.low, abs=2e-3) and hi == pytest.approx(ref.high, abs=2e-3)
    assert lo < d.mean() < hi
    assert all(math.isnan(x) for x in bootstrap_ci([0.1]))


def test_three_outcomes():
    # a +1e-6 lead on 2 cases: too few cases
    t = paired_test([0.800001, 0.700001], [0.8, 0.7], min_effect=0.005)
    assert t.status == "inconclusive" and "2 cases < 6 needed" in t.reason
    # a consistent but tiny lead on 12 cases: below the stated minimum effect
    t = paired_test(np.full(12, 0.8) + 1e-4 * np.arange(1, 13), np.full(12, 0.8), min_effect=0.005)
    assert t.status == "inconclusive" and "below the minimum" in t.reason
    # a clear reverse effect: not held
    rng = np.random.default_rng(0)
    b = rng.uniform(0.6, 0.9, 12)
    t = paired_test(b - 0.05 + rng.normal(0, 0.01, 12), b, min_effect=0.005)
    assert t.status == "not held" and t.effect < 0 and t.ci_high < 0
    assert "n=12" in t.describe()
    # non-finite pairs are dropped
    t = paired_test([0.9, float("nan")] * 6, [0.8, 0.1] * 6, min_effect=0.005)
    assert t.n == 6


def test_combine_is_intersection_union():
    assert combine(["held", "held"]) == "held"
    assert combine(["held", "inconclusive"]) == "inconclusive"
    assert combine(["held", "not held", "inconclusive"]) == "not held"
    assert combine([]) == "inconclusive"
    with pytest.raises(ValueError, match="not paired"):
        paired_test([1, 2], [1], min_effect=0)
