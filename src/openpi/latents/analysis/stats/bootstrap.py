"""Bootstrap confidence intervals for the language-loss analysis.

Pure numpy, deterministic given ``seed``. The representation metrics live in :mod:`openpi.latents.analysis.measures`
(which re-exports everything here), the task-decoding probe in :mod:`openpi.latents.analysis.measures.probe`.

* :func:`bootstrap_ci`: percentile bootstrap interval of a statistic of one sample.
* :func:`split_by_success`: a per-episode metric split by episode success, with a bootstrap interval for each side and
  for their difference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

__all__ = ["BootstrapCI", "SuccessSplit", "bootstrap_ci", "split_by_success"]


@dataclasses.dataclass(frozen=True)
class BootstrapCI:
    """A statistic with a percentile-bootstrap interval.

    Attributes:
        estimate: the statistic of the observed (non-NaN) values.
        low, high: the ``(1-ci)/2`` and ``(1+ci)/2`` quantiles (linear interpolation) of the statistic over ``n_boot``
            resamples with replacement. NaN when fewer than 2 values.
        n: number of non-NaN values used.
        ci: the coverage asked for.
        unit: what was resampled: "episode" (the values), or "task" (clusters of episodes:
            :func:`openpi.latents.analysis.stats.clustered.cluster_bootstrap_ci`).
        n_clusters: number of clusters (tasks) behind a clustered interval; None for an episode bootstrap.
    """

    estimate: float
    low: float
    high: float
    n: int
    ci: float
    unit: str = "episode"
    n_clusters: int | None = None

    def excludes_zero(self) -> bool:
        """True when the whole interval lies strictly on one side of 0 (False if it is NaN)."""
        return bool(self.low > 0 or self.high < 0)


def _apply_stat(statistic: Callable, samples: np.ndarray) -> np.ndarray:
    """``statistic`` of each row of ``samples`` [n_boot, n]: vectorized via ``axis=-1`` when supported."""
    try:
        out = np.asarray(statistic(samples, axis=-1), dtype=np.float64)
        if out.shape == samples.shape[:1]:
            return out
    except TypeError:
        pass
    return np.array([float(statistic(row)) for row in samples])


def _resampled(v: np.ndarray, n_boot: int, rng: np.random.Generator, statistic: Callable) -> np.ndarray:
    """The statistic over ``n_boot`` resamples with replacement of ``v``, drawn in blocks to bound memory."""
    out = np.empty(n_boot)
    block = max(1, 2_000_000 // max(len(v), 1))
    for s in range(0, n_boot, block):
        b = min(block, n_boot - s)
        out[s : s + b] = _apply_stat(statistic, v[rng.integers(0, len(v), size=(b, len(v)))])
    return out


def _ci_from(estimate: float, boots: np.ndarray | None, n: int, ci: float) -> BootstrapCI:
    if boots is None:
        return BootstrapCI(estimate, float("nan"), float("nan"), n, ci)
    return BootstrapCI(
        estimate, float(np.quantile(boots, 0.5 - ci / 2)), float(np.quantile(boots, 0.5 + ci / 2)), n, ci
    )


def _clean_1d(values) -> np.ndarray:
    v = np.asarray(values).astype(np.float64)
    if v.ndim != 1:
        raise ValueError(f"expected a 1-D array of per-episode values, got shape {v.shape}")
    return v


def bootstrap_ci(
    values, *, n_boot: int = 2000, ci: float = 0.95, seed: int = 0, statistic: Callable = np.mean
) -> BootstrapCI:
    """Percentile bootstrap interval of ``statistic(values)``.

    ``values`` is 1-D (e.g. one number per episode; resample the independent unit, not rollout steps). NaN values are
    dropped first (``n`` counts the rest). With no value everything is NaN; with one value the estimate is that value
    and the interval is NaN. ``statistic`` is called as ``statistic(x, axis=-1)`` on a [block, n] array when it accepts
    ``axis``, else once per resample. Deterministic given ``seed``. A constant sample gives a zero-width interval.
    """
    v = _clean_1d(values)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return BootstrapCI(float("nan"), float("nan"), float("nan"), 0, ci)
    est = float(statistic(v))
    if len(v) < 2:
        return _ci_from(est, None, 1, ci)
    return _ci_from(est, _resampled(v, n_boot, np.random.default_rng(seed), statistic), len(v), ci)


@dataclasses.dataclass(frozen=True)
class SuccessSplit:
    """A per-episode metric split by episode success (see :func:`split_by_success`).

    Attributes:
        success: statistic and interval over successful episodes.
        failure: statistic and interval over failed episodes.
        difference: ``statistic(success) - statistic(failure)`` with a bootstrap interval from resampling each side
            independently (stratified bootstrap). NaN when either side has fewer than 2 episodes (estimate NaN when
            either side is empty). Its ``n`` is the total number of episodes.
        n_success, n_failure: episodes on each side after dropping NaN values.
    """

    success: BootstrapCI
    failure: BootstrapCI
    difference: BootstrapCI
    n_success: int
    n_failure: int


def split_by_success(
    per_episode_values,
    success_flags,
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    statistic: Callable = np.mean,
) -> SuccessSplit:
    """Compare a per-episode metric between successful and failed episodes.

    ``per_episode_values`` [n_episodes] (one number per episode, e.g. a layer's language loss averaged over the
    episode's rollout steps) and ``success_flags`` [n_episodes] (bool). Episodes whose value is NaN are dropped. Each
    side gets :func:`bootstrap_ci`-style intervals, and the difference success − failure gets an interval from
    ``n_boot`` paired draws (one resample of each side per draw, same generator). Deterministic given ``seed``.
    """
    v = _clean_1d(per_episode_values)
    f = np.asarray(success_flags).astype(bool)
    if f.shape != v.shape:
        raise ValueError(f"values {v.shape} and success_flags {f.shape} differ")
    keep = ~np.isnan(v)
    vs, vf = v[keep & f], v[keep & ~f]
    rng = np.random.default_rng(seed)
    boots, ests = [], []
    for side in (vs, vf):
        ests.append(float(statistic(side)) if len(side) else float("nan"))
        boots.append(_resampled(side, n_boot, rng, statistic) if len(side) >= 2 else None)
    diff_boots = boots[0] - boots[1] if boots[0] is not None and boots[1] is not None else None
    return SuccessSplit(
        success=_ci_from(ests[0], boots[0], len(vs), ci),
        failure=_ci_from(ests[1], boots[1], len(vf), ci),
        difference=_ci_from(ests[0] - ests[1], diff_boots, len(vs) + len(vf), ci),
        n_success=len(vs),
        n_failure=len(vf),
    )
