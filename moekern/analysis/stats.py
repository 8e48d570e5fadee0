"""Small statistics used by validate, sweep and report: bootstrap CIs, IQR outlier filtering, Spearman.

numpy (+ scipy for Spearman's rank ties when present); deterministic under a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Estimate:
    """A point estimate with a percentile-bootstrap confidence interval (`level`, e.g. 0.95)."""

    value: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def fmt(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}g} [{self.low:.{digits}g}, {self.high:.{digits}g}] (n={self.n})"

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "n": self.n, "level": self.level}


def iqr_mask(x, k: float = 1.5) -> np.ndarray:
    """[N] bool, True for values inside [Q1 - k*IQR, Q3 + k*IQR] (Tukey fences); NaN is never kept.
    Fewer than 4 finite values: nothing is flagged (quartiles of 3 points mean little)."""
    a = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(a)
    if ok.sum() < 4:
        return ok
    q1, q3 = np.percentile(a[ok], [25, 75])
    iqr = q3 - q1
    return ok & (a >= q1 - k * iqr) & (a <= q3 + k * iqr)


def bootstrap_ci(x, stat=np.mean, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Percentile bootstrap of `stat` over the finite values of `x: [N]`."""
    a = np.asarray(x, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, level)
    value = float(stat(a))
    if a.size == 1:
        return Estimate(value, value, value, 1, level)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    boots = np.array([stat(a[i]) for i in idx])
    lo, hi = np.nanpercentile(boots, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return Estimate(value, float(lo), float(hi), int(a.size), level)


def _rank(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), 1-based."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = np.arange(1, a.size + 1)
    vals, inv = np.unique(a, return_inverse=True)
    sums = np.bincount(inv, weights=ranks)
    cnts = np.bincount(inv)
    return (sums / cnts)[inv]


def spearman(x, y) -> float:
    """Spearman's rho (Pearson correlation of average ranks); NaN with < 3 pairs or a constant input."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 3:
        return float("nan")
    ra, rb = _rank(a), _rank(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def spearman_ci(x, y, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Spearman's rho with a percentile-bootstrap CI over resampled pairs."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    rho = spearman(a, b)
    if a.size < 3:
        return Estimate(rho, float("nan"), float("nan"), int(a.size), level)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, a.size, size=a.size)
        boots.append(spearman(a[i], b[i]))
    boots = np.asarray(boots)
    boots = boots[np.isfinite(boots)]
    if boots.size == 0:
        return Estimate(rho, float("nan"), float("nan"), int(a.size), level)
    lo, hi = np.percentile(boots, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return Estimate(rho, float(lo), float(hi), int(a.size), level)


def spearman_pvalue(x, y) -> float:
    """Two-sided p-value of Spearman's rho (scipy), NaN when scipy is missing or n < 3."""
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return float("nan")
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).pvalue)


def bootstrap_diff(a, b, stat=np.mean, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Estimate:
    """stat(a) - stat(b) with a percentile-bootstrap CI, resampling a and b independently (finite values)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    if x.size == 0 or y.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), int(min(x.size, y.size)), level)
    value = float(stat(x) - stat(y))
    rng = np.random.default_rng(seed)
    boots = np.array([stat(x[rng.integers(0, x.size, x.size)]) - stat(y[rng.integers(0, y.size, y.size)])
                      for _ in range(n_boot)])
    lo, hi = np.percentile(boots, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return Estimate(value, float(lo), float(hi), int(min(x.size, y.size)), level)
