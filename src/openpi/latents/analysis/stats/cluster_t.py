"""Intervals with honest coverage at few clusters (tasks): the cluster-robust t interval.

A percentile bootstrap over K tasks undercovers when K is small (its resampling distribution is too narrow: for a
nominal 0.95 it covers 0.76 / 0.85 / 0.90 at 3 / 5 / 10 tasks). The interval here is the cluster-robust (CR1)
standard error of a weighted mean of per-cluster estimates with Student's t at K − 1 degrees of freedom (Cameron &
Miller 2015, "A practitioner's guide to cluster-robust inference", §VI): for equal weights and normal cluster
estimates it is exactly the one-sample t interval over the K cluster estimates (coverage = nominal at any K ≥ 2).

* :func:`weighted_cluster_t`: ``D = Σ w_k d_k / Σ w_k`` with ``se² = K/(K−1) · Σ w_k² (d_k − D)² / (Σ w_k)²``, the
  interval ``D ± t_{K−1, (1+ci)/2} · se``.
* :func:`ratio_difference_t`: the difference of two ratio means (success side − failure side, each ``Σ sums /
  Σ counts`` over the clusters) by linearisation, the same CR1 variance and t quantile.

``tests/test_statistics.py::test_cluster_intervals_cover_at_few_tasks`` measures the coverage at 3, 5 and 10 tasks.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as _scipy_stats

__all__ = ["INTERVAL_METHODS", "INTERVAL_NOTE", "ratio_difference_t", "t_quantile", "weighted_cluster_t"]

# "cluster-t" (default): CR1 standard error, Student's t at K − 1 df; "percentile": the task-bootstrap percentile
# interval (undercovers below ~20 tasks, kept for comparison).
INTERVAL_METHODS = ("cluster-t", "percentile")
INTERVAL_NOTE = (
    "intervals over tasks are cluster-robust t intervals (CR1 standard error over the K tasks, Student's t with "
    "K − 1 degrees of freedom; coverage ≥ 0.92 of a nominal 0.95 measured at 3, 5 and 10 tasks), not task-bootstrap "
    "percentiles (which cover 0.76 / 0.85 / 0.90 there); one task: its episodes resampled, for that task only"
)


def t_quantile(ci: float, df: int) -> float:
    """The ``(1 + ci) / 2`` quantile of Student's t with ``df`` degrees of freedom."""
    return float(_scipy_stats.t.ppf(0.5 + ci / 2, df))


def weighted_cluster_t(estimates, weights, ci: float = 0.95) -> tuple[float, float, float]:
    """(D, low, high): the weighted mean of per-cluster estimates with a CR1 / t_{K−1} interval (module docstring).

    ``estimates`` [K] and ``weights`` [K] (> 0; e.g. each task's episodes). Below two clusters the interval is NaN.
    """
    d = np.asarray(estimates, np.float64)
    w = np.asarray(weights, np.float64)
    if d.shape != w.shape or d.ndim != 1:
        raise ValueError(f"need estimates [K] and weights [K], got {d.shape} and {w.shape}")
    if len(d) == 0 or w.sum() <= 0:
        return float("nan"), float("nan"), float("nan")
    est = float(np.sum(w * d) / w.sum())
    k = len(d)
    if k < 2:
        return est, float("nan"), float("nan")
    se = float(np.sqrt(k / (k - 1) * np.sum((w * (d - est)) ** 2)) / w.sum())
    half = t_quantile(ci, k - 1) * se
    return est, est - half, est + half


def ratio_difference_t(sums_a, counts_a, sums_b, counts_b, ci: float = 0.95) -> tuple[float, float, float]:
    """(D, low, high) for ``D = Σ sums_a / Σ counts_a − Σ sums_b / Σ counts_b`` over K clusters ([K] each; a cluster
    may lack one side: counts 0), with the CR1 variance of the linearised difference and t_{K−1}. NaN below two
    clusters or with an empty side."""
    sa, na, sb, nb = (np.asarray(x, np.float64) for x in (sums_a, counts_a, sums_b, counts_b))
    if na.sum() <= 0 or nb.sum() <= 0:
        return float("nan"), float("nan"), float("nan")
    mean_a, mean_b = sa.sum() / na.sum(), sb.sum() / nb.sum()
    est = float(mean_a - mean_b)
    k = len(sa)
    if k < 2:
        return est, float("nan"), float("nan")
    resid = (sa - mean_a * na) / na.sum() - (sb - mean_b * nb) / nb.sum()  # each cluster's influence on D
    se = float(np.sqrt(k / (k - 1) * np.sum(resid**2)))
    half = t_quantile(ci, k - 1) * se
    return est, est - half, est + half
