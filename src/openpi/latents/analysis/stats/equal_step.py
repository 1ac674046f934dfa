"""Success vs failure at equal rollout steps, among the episodes still running, within task (the default split).

Successful LIBERO episodes end early and failures run to the step limit, while drift and attention grow with the
rollout step. Any per-episode summary over an episode's own steps (its mean, or its normalised-progress profile)
then differs between the outcomes from length alone: a metric that depends only on the step reads a gap of −0.137
[−0.149, −0.125] under progress alignment. Comparing at equal steps removes it.

Definition (:func:`equal_step_difference`). For task k and rollout step i (the inference index) let the episodes
**at risk** be those of task k that still run at step i and have a value there; ``s_ki`` and ``f_ki`` are the means
over the successful and the failed ones, ``n_ki`` their number. A step with both outcomes at risk contributes
``d_ki = s_ki − f_ki`` with weight ``n_ki``; the task's difference is ``d_k = Σ_i n_ki d_ki / W_k`` with
``W_k = Σ_i n_ki`` (episode-steps at risk), and the collection's ``D = Σ_k W_k d_k / Σ_k W_k`` over the tasks with
such a step. A metric whose law depends on the step alone gives ``D ≈ 0`` whatever the outcomes' lengths; a task
effect cancels within task.

Interval: the cluster-robust t interval over the contributing tasks (:mod:`~openpi.latents.analysis.stats.cluster_t`);
with one contributing task its episodes are resampled within each side (percentile, ``unit="episode"``). p-value:
success labels permuted within each task (each task keeps its number of successes; an episode keeps its own steps),
``(1 + #{|D_perm| ≥ |D|}) / (1 + n_permutations)``. The number at risk per step on each side is returned
(:attr:`EqualStepDifference.at_risk`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from openpi.latents.analysis.stats.bootstrap import BootstrapCI, SuccessSplit
from openpi.latents.analysis.stats.cluster_t import t_quantile, weighted_cluster_t
from openpi.latents.analysis.stats.clustered import WithinTaskDifference

__all__ = [
    "EQUAL_STEP_NOTE",
    "AtRisk",
    "EqualStepDifference",
    "equal_step_difference",
    "pooled_equal_step",
    "step_matrix",
]

EQUAL_STEP_NOTE = (
    "success − failure at equal rollout steps (inference index i), among the episodes of a task still running at "
    "step i, within task: per task and step the success mean minus the failure mean over the episodes at risk, "
    "weighted by their number; tasks combined with weights ∝ their episode-steps at risk"
)


@dataclasses.dataclass(frozen=True)
class AtRisk:
    """Episodes at risk at each rollout step (summed over the contributing tasks): [T] each."""

    n_success: np.ndarray
    n_failure: np.ndarray

    @property
    def n_steps_compared(self) -> int:
        """Rollout steps where both outcomes are at risk in some task."""
        return int(np.sum((self.n_success > 0) & (self.n_failure > 0)))

    def to_dict(self) -> dict:
        return {"n_success": self.n_success.astype(int).tolist(), "n_failure": self.n_failure.astype(int).tolist()}


@dataclasses.dataclass(frozen=True)
class EqualStepDifference(WithinTaskDifference):
    """:func:`equal_step_difference`'s result: the fields of :class:`~openpi.latents.analysis.stats.clustered.
    WithinTaskDifference` (``per_task``: {task: (d_k, n_success, n_failure)}) and the episodes at risk per step."""

    at_risk: AtRisk | None = None


def step_matrix(step_values: list[np.ndarray]) -> np.ndarray:
    """[episodes, max steps] float64: episode e's per-step values, NaN after its last step."""
    n = max((len(v) for v in step_values), default=0)
    out = np.full((len(step_values), n), np.nan)
    for i, v in enumerate(step_values):
        out[i, : len(v)] = np.asarray(v, np.float64).reshape(len(v))
    return out


def _task_stats(v0: np.ndarray, ok: np.ndarray, flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(D_k, W_k) [P] for P success-label rows ``flags`` [P, n] of one task (v0: values with NaN as 0; ok: valid)."""
    f = flags.astype(np.float64)
    ns, nf = f @ ok, (1 - f) @ ok  # [P, T] at risk on each side
    ss, sf = f @ v0, (1 - f) @ v0
    both = (ns > 0) & (nf > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(both, ss / np.where(ns > 0, ns, 1) - sf / np.where(nf > 0, nf, 1), 0.0)
    w = np.where(both, ns + nf, 0.0)
    return (w * d).sum(1), w.sum(1)


def _episode_bootstrap(v0, ok, flags, n_boot: int, ci: float, rng) -> tuple[float, float]:
    """Percentile interval of one task's d_k from resampling its episodes within each side (counts per draw)."""
    idx_s, idx_f = np.flatnonzero(flags), np.flatnonzero(~flags)
    boots = np.empty(n_boot)
    for b in range(n_boot):
        pick = np.concatenate([rng.choice(idx_s, len(idx_s)), rng.choice(idx_f, len(idx_f))])
        fl = np.zeros(len(pick), bool)
        fl[: len(idx_s)] = True
        dk, wk = _task_stats(v0[pick], ok[pick], fl[None])
        boots[b] = dk[0] / wk[0] if wk[0] > 0 else np.nan
    boots = boots[~np.isnan(boots)]
    if not len(boots):
        return float("nan"), float("nan")
    return float(np.quantile(boots, 0.5 - ci / 2)), float(np.quantile(boots, 0.5 + ci / 2))


def equal_step_difference(
    step_values: list[np.ndarray],
    success,
    tasks,
    *,
    n_boot: int = 2000,
    n_permutations: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> EqualStepDifference:
    """Success − failure at equal rollout steps within task (module docstring).

    ``step_values``: one [steps] array per episode (NaN where the metric is undefined at a step), ``success`` and
    ``tasks`` [episodes].
    """
    f = np.asarray(success).astype(bool)
    c = np.asarray(tasks)
    if not (len(step_values) == len(f) == len(c)):
        raise ValueError(f"need one value series, outcome and task per episode: {len(step_values)}, {len(f)}, {len(c)}")
    v = step_matrix(step_values)
    ok = ~np.isnan(v)
    v0 = np.where(ok, v, 0.0)
    nan = float("nan")
    floor = 1.0 / (1 + n_permutations)
    n_steps = v.shape[1]
    at_s, at_f = np.zeros(n_steps), np.zeros(n_steps)
    parts = []  # (task, rows, d_k, W_k)
    for t in np.unique(c):
        rows = np.flatnonzero(c == t)
        dk, wk = _task_stats(v0[rows], ok[rows], f[rows][None])
        if wk[0] <= 0:
            continue
        both = (f[rows].astype(float) @ ok[rows] > 0) & ((~f[rows]).astype(float) @ ok[rows] > 0)
        at_s += np.where(both, f[rows].astype(float) @ ok[rows], 0)
        at_f += np.where(both, (~f[rows]).astype(float) @ ok[rows], 0)
        parts.append((t, rows, float(dk[0] / wk[0]), float(wk[0])))
    n_tasks = len(np.unique(c[ok.any(1)])) if len(c) else 0
    at_risk = AtRisk(at_s, at_f)
    if not parts:
        empty = BootstrapCI(nan, nan, nan, 0, ci, "task", 0)
        return EqualStepDifference(empty, nan, floor, n_permutations, n_tasks, 0, 0, 0, {}, at_risk=at_risk)
    d = np.array([p[2] for p in parts])
    w = np.array([p[3] for p in parts])
    rng = np.random.default_rng(seed)
    if len(parts) >= 2:
        est, lo, hi = weighted_cluster_t(d, w, ci)
        unit = "task"
    else:
        _, rows, dk, _ = parts[0]
        est, unit = dk, "episode"
        lo, hi = _episode_bootstrap(v0[rows], ok[rows], f[rows], n_boot, ci, rng)
    n_s = int(sum(f[p[1]].sum() for p in parts))
    n_f = int(sum((~f[p[1]]).sum() for p in parts))
    diff = BootstrapCI(est, lo, hi, n_s + n_f, ci, unit, len(parts))
    p = _permutation_p(parts, v0, ok, f, est, n_permutations, rng)
    per_task = {_py(t): (dk, int(f[rows].sum()), int((~f[rows]).sum())) for t, rows, dk, _ in parts}
    return EqualStepDifference(diff, p, floor, n_permutations, n_tasks, len(parts), n_s, n_f, per_task, at_risk=at_risk)


def _py(x):
    return x.item() if isinstance(x, np.generic) else x


def _permutation_p(parts, v0, ok, f, est: float, n_perm: int, rng) -> float:
    if n_perm <= 0:
        return float("nan")
    num, den = np.zeros(n_perm), np.zeros(n_perm)
    for _, rows, _, _ in parts:
        flags = np.zeros((n_perm, len(rows)), bool)
        flags[:, : int(f[rows].sum())] = True
        flags = rng.permuted(flags, axis=1)
        dk, wk = _task_stats(v0[rows], ok[rows], flags)
        num += dk
        den += wk
    with np.errstate(invalid="ignore", divide="ignore"):
        perm = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
    hits = np.sum(np.abs(perm) >= abs(est) - 1e-12 * max(1.0, abs(est)))
    return float((1 + hits) / (1 + n_perm))


def _side_sums(v0: np.ndarray, ok: np.ndarray, f: np.ndarray, c: np.ndarray, uniq) -> np.ndarray:
    """[K, 4, T]: per task, the success sums and counts and the failure sums and counts at each step."""
    out = np.zeros((len(uniq), 4, v0.shape[1]))
    for i, t in enumerate(uniq):
        r = c == t
        out[i] = [f[r] @ v0[r], f[r] @ ok[r], (~f[r]) @ v0[r], (~f[r]) @ ok[r]]
    return out


def _pooled_from(sums: np.ndarray) -> tuple[float, float, float]:
    """(success, failure, difference) at-risk-weighted over the steps with both outcomes, from [4, T] sums."""
    ss, ns, sf, nf = sums
    both = (ns > 0) & (nf > 0)
    if not both.any():
        return float("nan"), float("nan"), float("nan")
    w = (ns + nf)[both]
    s_mean = float(np.sum(w * ss[both] / ns[both]) / w.sum())
    f_mean = float(np.sum(w * sf[both] / nf[both]) / w.sum())
    return s_mean, f_mean, s_mean - f_mean


def pooled_equal_step(step_values: list[np.ndarray], success, tasks, *, ci: float = 0.95):
    """The pooled (all tasks together, so confounded by task) equal-step split: at each rollout step the success and
    failure means over every episode at risk, weighted by the number at risk over the steps with both outcomes;
    each side and the difference with a delete-one-task jackknife t interval (t_{K−1}; NaN below two tasks).
    Returns a :class:`~openpi.latents.analysis.stats.SuccessSplit`."""
    f = np.asarray(success).astype(bool)
    c = np.asarray(tasks)
    v = step_matrix(step_values)
    ok = ~np.isnan(v)
    keep = ok.any(1)
    v, ok, f, c = v[keep], ok[keep], f[keep], c[keep]
    v0 = np.where(ok, v, 0.0)
    uniq = np.unique(c)
    sums = _side_sums(v0, ok.astype(np.float64), f, c, uniq)
    est = _pooled_from(sums.sum(0))
    k = len(uniq)
    nan = float("nan")
    bounds = [(nan, nan)] * 3
    if k >= 2 and not np.isnan(est[2]):
        total = sums.sum(0)
        loo = np.array([_pooled_from(total - sums[i]) for i in range(k)])  # [K, 3]
        with np.errstate(invalid="ignore"):
            se = np.sqrt((k - 1) / k * np.nansum((loo - np.nanmean(loo, 0)) ** 2, 0))
        half = t_quantile(ci, k - 1) * se
        bounds = [(float(e - h), float(e + h)) for e, h in zip(est, half)]
    n_s, n_f = int(f.sum()), int((~f).sum())
    sides = [
        BootstrapCI(e, lo, hi, n, ci, "task", k) for e, (lo, hi), n in zip(est, bounds, (n_s, n_f, n_s + n_f))
    ]
    return SuccessSplit(sides[0], sides[1], sides[2], n_s, n_f)
