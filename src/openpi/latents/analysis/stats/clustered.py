"""Statistics over clustered episodes: a task (cluster) bootstrap, the within-task success difference with a
within-task permutation test, and Holm's correction. Pure numpy, deterministic given ``seed``.

Episodes of one task share the prompt, the scene layout and the initial states' distribution, so they are not
independent: resampling episodes as if they were gives intervals far too narrow (10 tasks × 50 episodes: ~7×).
The unit of resampling here is the task. With a single task the task cannot be resampled; the interval then
resamples episodes within it and says so (``BootstrapCI.unit == "episode"``): it speaks for that task only.

* :func:`cluster_bootstrap_ci`: mean over episodes with a cluster-robust t interval over tasks (default; a task
  bootstrap percentile interval as an option, which undercovers at few tasks).
* :func:`within_task_difference`: success − failure per task (tasks with both outcomes), combined with weights
  proportional to each task's number of episodes; a cluster-robust t interval over tasks and a within-task
  permutation p-value (success labels permuted inside each task).
* :func:`holm`: Holm–Bonferroni adjusted p-values (the report picks the layer with the largest gap among L layers).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from openpi.latents.analysis.stats.bootstrap import BootstrapCI, SuccessSplit, split_by_success
from openpi.latents.analysis.stats.cluster_t import INTERVAL_METHODS, ratio_difference_t, weighted_cluster_t
from openpi.latents.analysis.stats.multiplicity import holm

__all__ = [
    "WithinTaskDifference",
    "cluster_bootstrap_ci",
    "holm",
    "pooled_split_by_task",
    "within_task_difference",
]


def _quantiles(boots: np.ndarray, ci: float) -> tuple[float, float]:
    return float(np.quantile(boots, 0.5 - ci / 2)), float(np.quantile(boots, 0.5 + ci / 2))


def cluster_bootstrap_ci(
    values, clusters, *, n_boot: int = 2000, ci: float = 0.95, seed: int = 0, method: str = "cluster-t"
) -> BootstrapCI:
    """Mean of ``values`` [n] (one per episode; NaN dropped) with an interval over clusters.

    ``method="cluster-t"`` (default): the cluster-robust t interval of the ratio estimator (CR1 standard error,
    t with K − 1 df; :mod:`~openpi.latents.analysis.stats.cluster_t`), whose coverage holds at 3, 5 and 10 tasks.
    ``method="percentile"``: the task-bootstrap percentile interval (undercovers at few tasks). Each draw takes
    as many clusters as there are, with replacement, and computes the mean over all episodes of
    the drawn clusters (the same ratio estimator as the point estimate, so unequal cluster sizes are weighted as in
    the estimate). With one cluster the episodes are resampled instead (``unit="episode"``); with fewer than two
    values the interval is NaN. ``n`` counts episodes, ``n_clusters`` clusters.
    """
    v = np.asarray(values, np.float64)
    c = np.asarray(clusters)
    if v.ndim != 1 or c.shape != v.shape:
        raise ValueError(f"need values [n] and clusters [n], got {v.shape} and {c.shape}")
    keep = ~np.isnan(v)
    v, c = v[keep], c[keep]
    uniq, idx = np.unique(c, return_inverse=True)
    nan = float("nan")
    if len(v) == 0:
        return BootstrapCI(nan, nan, nan, 0, ci, "task", 0)
    est = float(v.mean())
    rng = np.random.default_rng(seed)
    if len(uniq) < 2:
        if len(v) < 2:
            return BootstrapCI(est, nan, nan, len(v), ci, "episode", len(uniq))
        boots = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
        return BootstrapCI(est, *_quantiles(boots, ci), len(v), ci, "episode", 1)
    sums = np.bincount(idx, weights=v)
    counts = np.bincount(idx).astype(np.float64)
    if method not in INTERVAL_METHODS:
        raise ValueError(f"interval method must be one of {INTERVAL_METHODS}, got {method!r}")
    if method == "cluster-t":
        _, lo, hi = weighted_cluster_t(sums / counts, counts, ci)
        return BootstrapCI(est, lo, hi, len(v), ci, "task", len(uniq))
    draw = rng.integers(0, len(uniq), (n_boot, len(uniq)))
    boots = sums[draw].sum(1) / counts[draw].sum(1)
    return BootstrapCI(est, *_quantiles(boots, ci), len(v), ci, "task", len(uniq))


@dataclasses.dataclass(frozen=True)
class WithinTaskDifference:
    """Success − failure compared within task (:func:`within_task_difference`).

    Attributes:
        difference: ``Σ_k w_k (mean_success_k − mean_failure_k) / Σ_k w_k`` over the contributing tasks (both
            outcomes present), ``w_k`` = the task's number of episodes; interval: the cluster-robust t interval over
            the contributing tasks (t with K − 1 df); with one contributing task a bootstrap of its episodes within
            each side (``unit`` "episode").
        p_value: two-sided within-task permutation p-value, ``(1 + #{|D_perm| ≥ |D|}) / (1 + n_permutations)``:
            success labels shuffled inside each task (each task keeps its number of successes). NaN without a
            contributing task.
        p_floor: ``1 / (1 + n_permutations)``, the smallest p-value the test can give.
        n_permutations: permutations drawn.
        n_tasks: tasks with a value; n_tasks_contributing: those with both outcomes (the others cannot say anything
            about success within task).
        n_success, n_failure: episodes of the contributing tasks on each side.
        per_task: {task: (difference, n_success, n_failure)} of the contributing tasks.
        p_holm: the Holm-adjusted p-value over the layers compared together (set by the caller; NaN if not).
    """

    difference: BootstrapCI
    p_value: float
    p_floor: float
    n_permutations: int
    n_tasks: int
    n_tasks_contributing: int
    n_success: int
    n_failure: int
    per_task: dict
    p_holm: float = float("nan")


def _task_sides(v, f, c):
    """[(task, success values, failure values)] of the tasks with both outcomes; number of tasks with a value."""
    out = []
    tasks = np.unique(c)
    for t in tasks:
        sel = c == t
        s, fl = v[sel & f], v[sel & ~f]
        if len(s) and len(fl):
            out.append((t, s, fl))
    return out, len(tasks)


def _side_boots(x: np.ndarray, n_boot: int, rng) -> np.ndarray:
    return x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)


def within_task_difference(
    values, success, tasks, *, n_boot: int = 2000, n_permutations: int = 1000, ci: float = 0.95, seed: int = 0
) -> WithinTaskDifference:
    """Success − failure of a per-episode metric compared within each task, then combined (see the dataclass).

    ``values`` [n] (NaN dropped), ``success`` [n] bool, ``tasks`` [n] task ids. A metric that depends only on the task
    gives exactly 0 here (every within-task difference is 0) however the success rates differ between tasks, where
    the pooled difference (:func:`openpi.latents.analysis.stats.bootstrap.split_by_success`) would not.
    """
    v = np.asarray(values, np.float64)
    f = np.asarray(success).astype(bool)
    c = np.asarray(tasks)
    if not (v.ndim == 1 and f.shape == v.shape and c.shape == v.shape):
        raise ValueError(f"need values, success and tasks of one shape [n], got {v.shape}, {f.shape}, {c.shape}")
    keep = ~np.isnan(v)
    sides, n_tasks = _task_sides(v[keep], f[keep], c[keep])
    nan = float("nan")
    floor = 1.0 / (1 + n_permutations)
    if not sides:
        empty = BootstrapCI(nan, nan, nan, 0, ci, "task", 0)
        return WithinTaskDifference(empty, nan, floor, n_permutations, n_tasks, 0, 0, 0, {})
    w = np.array([len(s) + len(fl) for _, s, fl in sides], np.float64)
    d = np.array([s.mean() - fl.mean() for _, s, fl in sides])
    est = float(np.sum(w * d) / w.sum())
    rng = np.random.default_rng(seed)
    # Two-stage bootstrap: episodes within each side of each task, then tasks.
    n_s = sum(len(s) for _, s, _ in sides)
    n_f = sum(len(fl) for _, _, fl in sides)
    if len(sides) >= 2:  # the cluster-robust t interval over the contributing tasks
        _, lo, hi = weighted_cluster_t(d, w, ci)
        diff = BootstrapCI(est, lo, hi, n_s + n_f, ci, "task", len(sides))
    else:  # one task: its episodes resampled within each side
        (_, s1, f1), = sides
        boots = _side_boots(s1, n_boot, rng) - _side_boots(f1, n_boot, rng)
        diff = BootstrapCI(est, *_quantiles(boots, ci), n_s + n_f, ci, "episode", 1)
    p = _permutation_p(sides, w, est, n_permutations, rng)
    per_task = {_py(t): (float(dk), len(s), len(fl)) for (t, s, fl), dk in zip(sides, d)}
    return WithinTaskDifference(diff, p, floor, n_permutations, n_tasks, len(sides), n_s, n_f, per_task)


def _py(x):
    return x.item() if isinstance(x, np.generic) else x


def _permutation_p(sides, w, est: float, n_perm: int, rng) -> float:
    if n_perm <= 0:
        return float("nan")
    total = np.zeros(n_perm)
    for (_, s, fl), wk in zip(sides, w):
        x = np.concatenate([s, fl])
        flags = np.zeros((n_perm, len(x)), bool)
        flags[:, : len(s)] = True
        flags = rng.permuted(flags, axis=1)
        mean_s = (flags * x).sum(1) / len(s)
        mean_f = (~flags * x).sum(1) / len(fl)
        total += wk * (mean_s - mean_f)
    perm = total / w.sum()
    # a tolerance for float rounding: permutations that reproduce the observed split give the same |D|
    hits = np.sum(np.abs(perm) >= abs(est) - 1e-12 * max(1.0, abs(est)))
    return float((1 + hits) / (1 + n_perm))


def pooled_split_by_task(
    values, success, tasks, *, n_boot: int = 2000, ci: float = 0.95, seed: int = 0
) -> SuccessSplit:
    """Pooled success vs failure (all tasks together) with task-cluster intervals: each side's mean with
    :func:`cluster_bootstrap_ci`, and the difference from one task draw per resample (both sides of a drawn task
    enter). Pooled over tasks it is confounded by task whenever success rates differ between tasks: read
    :func:`within_task_difference` for success itself."""
    v = np.asarray(values, np.float64)
    f = np.asarray(success).astype(bool)
    c = np.asarray(tasks)
    keep = ~np.isnan(v)
    v, f, c = v[keep], f[keep], c[keep]
    sides = [cluster_bootstrap_ci(v[m], c[m], n_boot=n_boot, ci=ci, seed=seed) for m in (f, ~f)]
    nan = float("nan")
    est = sides[0].estimate - sides[1].estimate if f.any() and (~f).any() else nan
    uniq, idx = np.unique(c, return_inverse=True)
    diff = BootstrapCI(est, nan, nan, len(v), ci, "task", len(uniq))
    if f.sum() >= 2 and (~f).sum() >= 2 and len(uniq) >= 2:  # cluster-robust t of the difference of two ratios
        ms = [np.bincount(idx[m], weights=v[m], minlength=len(uniq)) for m in (f, ~f)]
        ns = [np.bincount(idx[m], minlength=len(uniq)) for m in (f, ~f)]
        _, lo, hi = ratio_difference_t(ms[0], ns[0], ms[1], ns[1], ci)
        diff = BootstrapCI(est, lo, hi, len(v), ci, "task", len(uniq))
    elif f.sum() >= 2 and (~f).sum() >= 2:  # one task: the difference resamples episodes within it
        diff = split_by_success(v, f, n_boot=n_boot, ci=ci, seed=seed).difference
    return SuccessSplit(sides[0], sides[1], diff, int(f.sum()), int((~f).sum()))
