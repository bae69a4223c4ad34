"""The statistics every comparison uses (the benchmark and ``rlpruner compare``):
paired differences with Student t intervals, percentile-bootstrap intervals and
Spearman's rank correlation, all from ``scipy.stats`` so nothing here is a
hand-written estimator.

Why t and not only the bootstrap: with 3-5 seeds a percentile bootstrap of the
mean resamples so few values that its interval is far too narrow; the paired t
interval is the honest one at these sample sizes. The bootstrap stays as a
second column where a caller wants it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

CONFIDENCE = 0.90          # the project's reporting level for every interval


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` over paired observations (the same seeds), in the units given."""

    n: int
    mean: float
    std: float                 # sample standard deviation of the differences
    low: float                 # Student t interval of the mean difference
    high: float
    p_value: float             # two-sided paired t test of "no difference"
    confidence: float

    def to_dict(self) -> dict:
        return asdict(self)

    def separated(self) -> bool:
        """The interval excludes 0 (either side)."""
        return self.low > 0 or self.high < 0

    def meets(self, at_least: float) -> bool:
        """A target stated as "at least ``at_least`` better, with the interval above
        0": the mean reaches the margin and the interval's low end is above 0."""
        return self.mean >= at_least and self.low > 0


def paired_difference(a, b, *, confidence: float = CONFIDENCE, scale: float = 1.0) -> PairedDifference:
    """Paired Student t interval of ``mean(a - b)`` (``a`` and ``b`` in the same
    order, e.g. by seed), each difference multiplied by ``scale`` (100 for points
    from fractions). Fewer than 2 pairs give a NaN interval; identical differences
    give a zero-width one (a t interval is undefined there, and the data say no
    more than the single value)."""
    from scipy import stats
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples need equal 1-D shapes, got {a.shape} and {b.shape}")
    d = (a - b) * scale
    n = int(d.size)
    if n == 0:
        return PairedDifference(0, math.nan, math.nan, math.nan, math.nan, math.nan, confidence)
    mean = float(d.mean())
    if n < 2:
        return PairedDifference(n, mean, math.nan, math.nan, math.nan, math.nan, confidence)
    std = float(d.std(ddof=1))
    if std == 0.0:
        return PairedDifference(n, mean, 0.0, mean, mean, 0.0 if mean != 0 else 1.0, confidence)
    result = stats.ttest_rel(a * scale, b * scale)
    ci = result.confidence_interval(confidence_level=confidence)
    return PairedDifference(n, mean, std, float(ci.low), float(ci.high), float(result.pvalue), confidence)


def bootstrap_interval(values, *, statistic=np.mean, confidence: float = CONFIDENCE, resamples: int = 10000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``statistic`` of ``values`` (a 1-D sample).
    NaN for fewer than 2 values or a constant sample."""
    from scipy import stats
    values = np.asarray(list(values), dtype=np.float64)
    if values.size < 2 or np.all(values == values[0]):
        return math.nan, math.nan
    res = stats.bootstrap((values,), statistic, confidence_level=confidence, n_resamples=resamples,
                          method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def spearman(x, y) -> float:
    """Spearman's rank correlation (ties averaged); NaN when either side is constant."""
    from scipy import stats
    x = np.asarray(list(x), dtype=np.float64)
    y = np.asarray(list(y), dtype=np.float64)
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def spearman_interval(x, y, *, confidence: float = CONFIDENCE, resamples: int = 10000,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of Spearman's rho, resampling (x, y) pairs."""
    from scipy import stats
    x = np.asarray(list(x), dtype=np.float64)
    y = np.asarray(list(y), dtype=np.float64)
    if x.size < 3:
        return math.nan, math.nan

    def rho(xs, ys):
        # a resample can be constant on one side: its rho is undefined, not 0
        with np.errstate(invalid="ignore", divide="ignore"):
            return stats.spearmanr(xs, ys).statistic

    res = stats.bootstrap((x, y), rho, paired=True, vectorized=False, confidence_level=confidence,
                          n_resamples=resamples, method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
