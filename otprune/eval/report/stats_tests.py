"""The report's statistics (`scipy.stats`): the paper's Spearman correlation between OT-distance
rank and task-score rank (Fig. 2) and its one-sided Wilcoxon signed-rank test of the relative
per-metric improvement over a baseline (Sec. 5.2: OTPrune vs DivPrune, p = 0.028).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Correlation:
    """Spearman's rho between two rankings of n items and its two-sided p-value (None when n < 3
    or a ranking is constant)."""

    n: int
    rho: float | None
    p: float | None


def spearman(distances: Sequence[float], scores: Sequence[float]) -> Correlation:
    """Spearman's rho between the rank of the distance (smallest = rank 1) and the rank of the
    score (highest = rank 1), as in the paper's Fig. 2: rho > 0 means a closer kept set goes with
    a better score. `scipy.stats.spearmanr` (average ranks for ties; p from the t distribution)."""
    from scipy import stats

    if len(distances) != len(scores):
        raise ValueError(f"distances and scores: one each per item, got {len(distances)} and {len(scores)}")
    n = len(distances)
    if n < 3 or len(set(distances)) < 2 or len(set(scores)) < 2:
        return Correlation(n, None, None)
    result = stats.spearmanr(distances, [-score for score in scores])
    return Correlation(n, float(result.statistic), float(result.pvalue))


@dataclasses.dataclass(frozen=True)
class SignedRank:
    """The one-sided Wilcoxon signed-rank test of `improvements` (% relative, one per metric) > 0:
    n pairs (zeros included), the statistic W+ (sum of the ranks of the positive differences,
    zeros dropped), p (None when every difference is 0)."""

    n: int
    statistic: float | None
    p: float | None
    median: float | None


def relative_improvement(value: float, baseline: float) -> float:
    """100 (value - baseline) / |baseline|: the % improvement of a metric over its baseline."""
    if baseline == 0:
        raise ValueError(f"baseline={baseline!r}: a relative improvement needs a non-zero baseline value")
    return 100.0 * (value - baseline) / abs(baseline)


def wilcoxon_greater(improvements: Sequence[float]) -> SignedRank:
    """`scipy.stats.wilcoxon(improvements, alternative="greater")`: is the median improvement > 0?
    (zero differences dropped, Wilcoxon's convention; exact distribution for small samples
    without ties, as scipy chooses)."""
    from scipy import stats

    values = [float(v) for v in improvements]
    ordered = sorted(values)
    median = None
    if values:
        mid = len(ordered) // 2
        median = ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
    if not any(values):
        return SignedRank(len(values), None, None, median)
    result = stats.wilcoxon(values, alternative="greater")
    return SignedRank(len(values), float(result.statistic), float(result.pvalue), median)
