"""rlpruner_ray.stats: the intervals every comparison reports, checked against
values computed by hand from their textbook definitions."""
import math

import numpy as np
import pytest

from rlpruner_ray import stats


def test_paired_t_interval_matches_the_textbook_formula():
    a = [0.80, 0.82, 0.81, 0.79, 0.83]
    b = [0.79, 0.80, 0.81, 0.80, 0.80]
    d = np.subtract(a, b)
    r = stats.paired_difference(a, b, scale=100)
    half = 2.1318 * d.std(ddof=1) / math.sqrt(5) * 100     # t(0.95, df=4) = 2.1318
    assert r.n == 5 and r.mean == pytest.approx(100 * d.mean())
    assert r.low == pytest.approx(100 * d.mean() - half, abs=1e-3)
    assert r.high == pytest.approx(100 * d.mean() + half, abs=1e-3)
    assert 0 < r.p_value < 1 and r.confidence == 0.9


def test_target_is_met_only_as_stated():
    clear = stats.paired_difference([0.81, 0.82, 0.815, 0.812, 0.818], [0.80, 0.81, 0.80, 0.80, 0.81], scale=100)
    assert clear.low > 0 and clear.meets(0.5) and clear.separated()
    noisy = stats.paired_difference([0.83, 0.78, 0.84, 0.77, 0.83], [0.80, 0.80, 0.80, 0.80, 0.80], scale=100)
    assert noisy.mean >= 0.5 and not noisy.meets(0.5) and not noisy.separated()
    worse = stats.paired_difference([0.79, 0.78, 0.79], [0.80, 0.80, 0.80], scale=100)
    assert worse.separated() and not worse.meets(0.0)


def test_degenerate_samples_give_nan_or_zero_width_not_errors():
    one = stats.paired_difference([0.8], [0.7])
    assert one.n == 1 and one.mean == pytest.approx(0.1) and math.isnan(one.low) and math.isnan(one.high)
    same = stats.paired_difference([0.5, 0.75], [0.25, 0.5])       # exact in binary: both differences 0.25
    assert same.low == same.high == 0.25 and same.std == 0.0
    assert math.isnan(stats.paired_difference([], []).mean)
    with pytest.raises(ValueError):
        stats.paired_difference([1, 2], [1])
    assert all(math.isnan(v) for v in stats.bootstrap_interval([0.5]))
    assert all(math.isnan(v) for v in stats.bootstrap_interval([0.5, 0.5, 0.5]))


def test_bootstrap_interval_stays_inside_the_data_and_covers_the_mean():
    values = [0.01, 0.02, 0.03, 0.012, 0.018]
    low, high = stats.bootstrap_interval(values, resamples=2000)
    assert min(values) <= low < np.mean(values) < high <= max(values)
    assert stats.bootstrap_interval(values, resamples=2000) == (low, high)     # seeded: reproducible


def test_spearman_is_rank_correlation_with_averaged_ties():
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks of x: 1, 3.5, 3.5, 2 ... Pearson of the rank vectors, computed by hand
    x, y = [0.1, 0.5, 0.5, 0.3], [1, 3, 2, 2]
    rx, ry = np.array([1, 3.5, 3.5, 2]), np.array([1, 4, 2.5, 2.5])
    assert stats.spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert math.isnan(stats.spearman([1, 1, 1], [1, 2, 3]))
    low, high = stats.spearman_interval(list(range(30)), [v + (v % 3) for v in range(30)], resamples=500)
    assert 0.8 < low <= high <= 1.0
