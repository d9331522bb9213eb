"""Paired statistics that decide the paper's claims: held / not held / inconclusive.

A claim "A beats B" is decided on the paired differences ``d_i = a_i - b_i`` over the test cases both
models share (one value per (fold, case)):

1. fewer than ``min_cases(alpha)`` pairs -> inconclusive: below that n even differences that all
   agree in sign cannot reach two-sided p < alpha in the exact Wilcoxon test (n = 6 for alpha = 0.05,
   where all-positive gives p = 2/2^6 = 0.031);
2. ``|mean d| < min_effect`` -> inconclusive (an effect too small to matter, stated with the claim);
3. Wilcoxon signed-rank test, two-sided (scipy; exact for n <= 50 without ties, zero differences
   dropped): p >= alpha -> inconclusive; p < alpha -> held if mean d > 0, not held if mean d < 0.

Beside p, the percentile bootstrap 95% CI of the mean paired difference (``n_boot`` resamples of the
cases, seeded: same data -> same CI) is shown. A claim made of several comparisons ("beats each U-Net
variant") holds only if every comparison holds (an intersection-union test: no multiplicity correction
is needed), is not held if any comparison is not held, and is inconclusive otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
HELD, NOT_HELD, INCONCLUSIVE = "held", "not held", "inconclusive"


def min_cases(alpha: float = ALPHA) -> int:
    """Smallest n at which n same-sign differences give an exact two-sided Wilcoxon p < alpha (2 / 2^n)."""
    n = 1
    while 2.0 / 2**n >= alpha:
        n += 1
    return n


@dataclass(frozen=True)
class PairedTest:
    """Outcome of one paired comparison. effect = mean(a - b); ci = bootstrap 95% CI of it; p = Wilcoxon
    two-sided (NaN when not computed); reason: why it is inconclusive ('' otherwise)."""

    status: str
    n: int
    effect: float
    ci_low: float
    ci_high: float
    p: float
    min_effect: float
    min_n: int
    reason: str = ""

    def describe(self, *, scale: float = 100.0, unit: str = " pts") -> str:
        """e.g. 'n=12, +2.10 pts [95% CI +1.20, +3.00], p=0.0005'."""
        if self.n == 0:
            return "n=0"
        ci = ""
        if math.isfinite(self.ci_low):
            ci = f" [95% CI {scale * self.ci_low:+.2f}, {scale * self.ci_high:+.2f}]"
        p = f", p={self.p:.2g}" if math.isfinite(self.p) else ""
        why = f" ({self.reason})" if self.reason else ""
        return f"n={self.n}, {scale * self.effect:+.2f}{unit}{ci}{p}{why}"


def bootstrap_ci(d: Sequence[float], *, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``d`` (resampling its entries with replacement)."""
    a = np.asarray(d, dtype=np.float64)
    if a.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_test(
    a: Sequence[float],
    b: Sequence[float],
    *,
    min_effect: float,
    alpha: float = ALPHA,
    n_boot: int = 10000,
    seed: int = 0,
) -> PairedTest:
    """Decide "a beats b" on paired values (non-finite pairs dropped); see the module docstring."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired_test: {x.shape} and {y.shape} values are not paired")
    ok = np.isfinite(x) & np.isfinite(y)
    d = x[ok] - y[ok]
    n, need = int(d.size), min_cases(alpha)
    effect = float(d.mean()) if n else float("nan")
    lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=seed)
    p = float("nan")
    if n >= need and np.any(d != 0):
        p = float(stats.wilcoxon(d, alternative="two-sided").pvalue)
    common = dict(n=n, effect=effect, ci_low=lo, ci_high=hi, p=p, min_effect=float(min_effect), min_n=need)
    if n < need:
        return PairedTest(INCONCLUSIVE, reason=f"{n} cases < {need} needed", **common)
    if abs(effect) < min_effect:
        return PairedTest(INCONCLUSIVE, reason=f"|effect| below the minimum {min_effect:g}", **common)
    if not p < alpha:
        return PairedTest(INCONCLUSIVE, reason=f"p >= {alpha:g}", **common)
    return PairedTest(HELD if effect > 0 else NOT_HELD, **common)


def combine(statuses: Sequence[str]) -> str:
    """All held -> held; any not held -> not held; otherwise inconclusive (intersection-union)."""
    if not statuses:
        return INCONCLUSIVE
    if all(s == HELD for s in statuses):
        return HELD
    if any(s == NOT_HELD for s in statuses):
        return NOT_HELD
    return INCONCLUSIVE
