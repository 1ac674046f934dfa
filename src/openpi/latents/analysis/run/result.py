"""What :func:`openpi.latents.analysis.analyze_collection` returns, and its summaries over episodes.

* ``step_values[(stream, metric)]``: one float array [rollout steps, layers] per episode (NaN where undefined), for
  every metric of :data:`openpi.latents.analysis.metrics.registry.REGISTRY` that applies.
* ``probes[stream]``: one :class:`ProbeResult` per layer (task id from the stream's pooled features, folds grouped
  by episode, chance and shuffled control).
* ``attention``: NaN-aware sums over all rollout steps of the attention summaries (action queries per denoising step,
  the state query once, per head; of the text mass, the normalised text mass and the BOS mass) and their counts, read
  through :func:`attention_means`; ``attention["denoise_steps"]`` the denoising-step id of each row,
  ``attention["state_step_spread:<series>"]`` the largest state-query deviation across denoising steps (0 expected).
* ``actions``: per episode [steps] action-chunk divergence (mean L2 over the chunk) under the counterfactual prompt.

Summaries over episodes (:meth:`CollectionAnalysis.per_layer`, :meth:`heatmap_progress`, :meth:`success_split`,
:meth:`within_task_split`): a metric is first averaged over an episode's rollout steps (``drift`` /
``centred_drift`` without step 0, which is 0 by definition: :data:`STEP0_ZERO`, the same everywhere); intervals are
task-cluster t intervals (episodes of one task share prompt and scene and are not independent; a one-task collection
resamples its episodes and says so). The success split leaves out episodes that ended with an error and, by default
(``success_window="step"``), compares the outcomes at equal rollout steps among the episodes still running, within
task (:mod:`~openpi.latents.analysis.stats.equal_step`; the number at risk per step in :meth:`split_info`): successes
end
early and drift grows with the step, so any per-episode summary differs by length alone. Normalised progress
(``"progress"``, :func:`progress_bins`) is kept as a labelled secondary view. Within-task permutation p-values carry
Holm's correction over layers; the pooled comparison (:meth:`success_split`) is kept beside it and is confounded by
task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from openpi.latents.analysis import measures as M
from openpi.latents.analysis.data import streams as S
from openpi.latents.analysis.metrics.registry import BY_NAME, NOT_APPLICABLE
from openpi.latents.analysis.stats.clustered import (
    WithinTaskDifference,
    cluster_bootstrap_ci,
    holm,
    pooled_split_by_task,
    within_task_difference,
)
from openpi.latents.analysis.stats.equal_step import equal_step_difference, pooled_equal_step


@dataclasses.dataclass(frozen=True)
class EpisodeRef:
    task_id: int
    episode: int
    success: bool
    n_steps: int
    step_t: tuple[int, ...]
    prompt: str | None
    counterfactual_prompt: str | None
    error: str | None


@dataclasses.dataclass
class CollectionAnalysis:
    """Everything :func:`analyze_collection` computed (see the module docstring); summaries are methods."""

    source: dict[str, Any]
    episodes: list[EpisodeRef]
    streams: dict[str, S.Stream]
    missing: dict[str, str]
    step_values: dict[tuple[str, str], list[np.ndarray]]
    probes: dict[str, list[M.ProbeResult]]
    attention: dict[str, np.ndarray]
    actions: dict[str, list[np.ndarray]]
    settings: dict[str, Any]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    # {what: note}: how layer / denoising-step ids and camera validity were resolved when not read off the manifest
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    # text_only counterfactual reruns: positions compared per rerun (same token under both prompts)
    cf_text_positions: list[int] = dataclasses.field(default_factory=list)
    # pooled metrics (registry scope "pooled"): (stream, metric) -> one PooledValue (or None) per stored layer, and
    # the sample they were computed on (openpi.latents.analysis.metrics.pooled_rows)
    pooled: dict[tuple[str, str], list] = dataclasses.field(default_factory=dict)
    pooled_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    # the same analysis of a control collection (random-initialised model / second checkpoint), and what it is
    control: CollectionAnalysis | None = None
    control_label: str | None = None
    # work shared by one metric across the episodes of a layer (collection-level fits such as prompt decoding)
    shared: dict[Any, Any] = dataclasses.field(default_factory=dict)
    # expert-1 prompt sensitivity per denoising step × layer, {"free", "teacher_forced"} ->
    # openpi.latents.analysis.run.denoise_sensitivity.DenoiseSensitivity
    denoise_sensitivity: dict[str, Any] = dataclasses.field(default_factory=dict)
    # stream -> one {metric: floor} per layer: the bf16 precision floor of the comparison metrics
    # (openpi.latents.analysis.measures.precision_floor; absent for float32 captures)
    precision_floor: dict[str, list[dict[str, float]]] = dataclasses.field(default_factory=dict)

    def has(self, stream: str, metric: str) -> bool:
        return (stream, metric) in self.step_values

    def layers(self, stream: str) -> list[int]:
        return list(self.streams[stream].layers)

    def reason(self, stream: str, metric: str) -> str | None:
        """Why ``metric`` has no values for ``stream`` (None when it has)."""
        if self.has(stream, metric):
            return None
        if stream not in BY_NAME[metric].streams:
            return NOT_APPLICABLE["attention" if metric.startswith("attention_to_") else stream]
        if stream not in self.streams:
            return self.missing.get(stream, "stream not captured")
        return self.missing.get(f"{stream}.{metric}", "not computed")

    def per_episode(self, stream: str, metric: str, n_steps: int | None = None) -> np.ndarray:
        """[episodes, layers]: each episode's mean over its rollout steps, or over its first ``n_steps`` only (drift
        and centred drift: without step 0, which is 0 by definition, :data:`STEP0_ZERO`; NaN for an episode without
        a value)."""
        out = []
        for v in self.step_values[(stream, metric)]:
            v = v if n_steps is None else v[:n_steps]
            v = v[1:] if metric in STEP0_ZERO else v
            with quiet_nan_warnings():
                out.append(np.nanmean(v, axis=0) if len(v) else np.full(v.shape[1], np.nan))
        return np.asarray(out)

    def per_layer(self, stream: str, metric: str, *, n_boot: int | None = None) -> list[M.BootstrapCI]:
        """Per layer: mean over episodes of :meth:`per_episode`, with a task-cluster bootstrap interval (episodes of
        one task are not independent; one task: episodes resampled, ``unit="episode"``)."""
        pe = self.per_episode(stream, metric)
        nb = self.settings["n_boot"] if n_boot is None else n_boot
        tasks = self.task_ids()
        seed = self.settings["seed"]
        return [cluster_bootstrap_ci(pe[:, j], tasks, n_boot=nb, seed=seed) for j in range(pe.shape[1])]

    def task_ids(self) -> np.ndarray:
        """[episodes] the task of each episode (the cluster of every interval)."""
        return np.array([e.task_id for e in self.episodes])

    def progress_values(self, stream: str, metric: str, n_bins: int | None = None) -> np.ndarray:
        """[episodes, n_bins, layers]: each episode's metric by normalised progress (:func:`progress_bins`; drift
        without step 0, which is 0 by definition). An episode with any value has a value in every bin."""
        k = n_bins or self.settings.get("progress_bins", 10)
        out = []
        for v in self.step_values[(stream, metric)]:
            out.append(progress_bins(v[1:] if metric in STEP0_ZERO else v, k))
        return np.stack(out) if out else np.zeros((0, k, 0))

    def heatmap_progress(self, stream: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """([layers, bins] mean over episodes by normalised progress, [layers, bins] episodes behind each cell)."""
        pv = self.progress_values(stream, metric)
        with quiet_nan_warnings():
            return np.nanmean(pv, axis=0).T, np.sum(~np.isnan(pv), axis=0).T

    def step_series(self, stream: str, metric: str, layer_index: int) -> list[np.ndarray]:
        """One [steps] array per episode of one layer, rows by rollout step (inference index); step 0 of drift and
        centred drift NaN (0 by definition: no information)."""
        out = []
        for v in self.step_values[(stream, metric)]:
            x = np.array(v[:, layer_index], np.float64)
            if metric in STEP0_ZERO and len(x):
                x[0] = np.nan
            out.append(x)
        return out

    def window_values(self, stream: str, metric: str, window: str | None = None) -> np.ndarray:
        """[episodes, layers] the per-episode value a per-episode success split compares (see :meth:`split_window`;
        the default window "step" compares per rollout step instead, :meth:`within_task_split`)."""
        window = window or self.settings.get("success_window", DEFAULT_WINDOW)
        if window == "step":
            raise ValueError("window 'step' compares rollout steps, not per-episode values: use within_task_split")
        if window == "progress":
            with quiet_nan_warnings():
                return np.nanmean(self.progress_values(stream, metric), axis=1)
        return self.per_episode(stream, metric, n_steps=self.split_window(window))

    def heatmap(self, stream: str, metric: str) -> np.ndarray:
        """[layers, rollout-step index]: mean over the episodes that reached that step (NaN where none)."""
        vals = self.step_values[(stream, metric)]
        n = max(len(v) for v in vals)
        grid = np.full((len(vals), n, vals[0].shape[1]), np.nan)
        for i, v in enumerate(vals):
            grid[i, : len(v)] = v
        with quiet_nan_warnings():
            return np.nanmean(grid, axis=0).T

    def split_mask(self) -> np.ndarray:
        """[episodes] bool: the episodes of the success split (no error, at least one rollout step)."""
        return np.array([e.error is None and e.n_steps > 0 for e in self.episodes], bool)

    def split_counts(self) -> tuple[int, int]:
        """(successful, failed) episodes in the success split."""
        keep = self.split_mask()
        n_s = sum(e.success for e, k in zip(self.episodes, keep) if k)
        return n_s, int(keep.sum()) - n_s

    def split_window(self, window: str | None = None) -> int | None:
        """Rollout steps each episode is averaged over in the success split: None for ``window="step"`` (the
        default: equal rollout steps, :mod:`~openpi.latents.analysis.stats.equal_step`), "progress" (every episode by
        normalised progress, a secondary view confounded by length) and "all" (all its steps); for "common" the
        fewest steps of any episode in the split."""
        window = window or self.settings.get("success_window", DEFAULT_WINDOW)
        if window not in WINDOWS:
            raise ValueError(f"success window must be one of {WINDOWS}, got {window!r}")
        if window in ("all", "progress", "step"):
            return None
        n = [e.n_steps for e, k in zip(self.episodes, self.split_mask()) if k]
        return min(n) if n else None

    def split_info(self, window: str | None = None) -> dict[str, Any]:
        """What the success split compares: window, steps, episodes left out (errors) and the counts per side."""
        window = window or self.settings.get("success_window", DEFAULT_WINDOW)
        n_s, n_f = self.split_counts()
        errored = [e for e in self.episodes if e.error is not None]
        keep = self.split_mask()
        tasks = {e.task_id: set() for e, k in zip(self.episodes, keep) if k}
        for e, k in zip(self.episodes, keep):
            if k:
                tasks[e.task_id].add(e.success)
        return {
            "window": window,
            "n_inferences": self.split_window(window),
            "progress_bins": self.settings.get("progress_bins", 10) if window == "progress" else None,
            "at_risk": self.at_risk() if window == "step" else None,
            "n_tasks": len(tasks),
            "n_tasks_both_outcomes": sum(len(v) == 2 for v in tasks.values()),
            "n_success": n_s,
            "n_failure": n_f,
            "excluded_errored": [
                {"task_id": e.task_id, "episode": e.episode, "n_steps": e.n_steps, "error": e.error} for e in errored
            ],
        }

    def at_risk(self) -> dict[str, list[int]]:
        """Episodes still running at each rollout step (inference index), per outcome, over the episodes of the
        split in tasks with both outcomes (metric-independent: a metric's NaN steps lower its own counts, given with
        its comparison)."""
        keep = self.split_mask()
        eps = [e for e, k in zip(self.episodes, keep) if k]
        both = {t for t in {e.task_id for e in eps} if len({e.success for e in eps if e.task_id == t}) == 2}
        n = max((e.n_steps for e in eps), default=0)
        out = {"n_success": [0] * n, "n_failure": [0] * n}
        for e in eps:
            if e.task_id in both:
                side = out["n_success" if e.success else "n_failure"]
                for i in range(e.n_steps):
                    side[i] += 1
        return out

    def success_split(self, stream: str, metric: str, window: str | None = None) -> list[M.SuccessSplit]:
        """Per layer: successful vs failed episodes pooled over tasks (errored episodes left out), each episode
        summarised by :meth:`window_values` (window "step", the default: at equal rollout steps among the episodes
        at risk, :func:`~openpi.latents.analysis.stats.equal_step.pooled_equal_step`); task-cluster intervals. Pooled,
        so
        confounded by task when success rates differ by task: :meth:`within_task_split` is the comparison to read."""
        window = window or self.settings.get("success_window", DEFAULT_WINDOW)
        keep = self.split_mask()
        flags = np.array([e.success for e in self.episodes])[keep]
        tasks, s = self.task_ids()[keep], self.settings
        if window == "step":
            return [
                pooled_equal_step(
                    [v for v, k in zip(self.step_series(stream, metric, j), keep) if k], flags, tasks, ci=0.95
                )
                for j in range(self._n_layers(stream, metric))
            ]
        pe = self.window_values(stream, metric, window)
        return [
            pooled_split_by_task(pe[keep, j], flags, tasks, n_boot=s["n_boot"], seed=s["seed"])
            for j in range(pe.shape[1])
        ]

    def _n_layers(self, stream: str, metric: str) -> int:
        vals = self.step_values[(stream, metric)]
        return vals[0].shape[1] if vals else 0

    def within_task_split(self, stream: str, metric: str, window: str | None = None) -> list[WithinTaskDifference]:
        """Per layer: success − failure within task, with the within-task permutation p-value and its Holm
        adjustment over the layers (``p_holm``), for picking a layer. Window "step" (default): at equal rollout steps
        among the episodes at risk (:func:`~openpi.latents.analysis.stats.equal_step.equal_step_difference`, with the
        number at risk per step); else per-episode values (:func:`within_task_difference`)."""
        window = window or self.settings.get("success_window", DEFAULT_WINDOW)
        keep = self.split_mask()
        flags = np.array([e.success for e in self.episodes])[keep]
        tasks, s = self.task_ids()[keep], self.settings
        if window == "step":
            out = [
                equal_step_difference(
                    [v for v, k in zip(self.step_series(stream, metric, j), keep) if k], flags, tasks,
                    n_boot=s["n_boot"], n_permutations=s.get("n_permutations", 1000), seed=s["seed"],
                )
                for j in range(self._n_layers(stream, metric))
            ]  # fmt: skip
            adjusted = holm([x.p_value for x in out])
            return [dataclasses.replace(x, p_holm=float(p)) for x, p in zip(out, adjusted)]
        pe = self.window_values(stream, metric, window)
        out = [
            within_task_difference(
                pe[keep, j], flags, tasks, n_boot=s["n_boot"], n_permutations=s.get("n_permutations", 1000),
                seed=s["seed"],
            )
            for j in range(pe.shape[1])
        ]  # fmt: skip
        adjusted = holm([x.p_value for x in out])
        return [dataclasses.replace(x, p_holm=float(p)) for x, p in zip(out, adjusted)]

    def action_divergence_per_episode(self, n_steps: int | None = None) -> np.ndarray:
        """[episodes] mean over the reruns (among the first ``n_steps`` rollout steps) of the action divergence."""
        with quiet_nan_warnings():
            return np.array(
                [np.nanmean(v[:n_steps]) if np.any(~np.isnan(v[:n_steps])) else np.nan for v in self.actions["mean_l2"]]
            )


# "step" (default): equal rollout steps among the episodes still running, within task; "progress": normalised
# progress (secondary: confounded by episode length); "common": the first N steps (N = the shortest episode); "all".
WINDOWS = ("step", "progress", "common", "all")
DEFAULT_WINDOW = "step"
# Metrics that are 0 at step 0 by definition (measured against the episode's first step): step 0 is left out of every
# summary, so each has one value wherever it is reported.
STEP0_ZERO = frozenset({"drift", "centred_drift"})


def progress_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    """[steps, ...] per-step values → [n_bins, ...] by normalised progress.

    Step i of n covers progress [i/n, (i+1)/n); bin k covers [k/K, (k+1)/K). A bin's value is the mean of the
    non-NaN steps overlapping it, weighted by the overlap. Every bin of an episode with one non-NaN step or more gets
    a value (a 1-step episode fills every bin with its one value), so no window collapses; NaN only where no
    overlapping step has a value. The mean over bins equals the step mean weighted by each step's share of progress.
    """
    v = np.asarray(values, np.float64)
    n = len(v)
    out_shape = (n_bins,) + v.shape[1:]
    if n == 0:
        return np.full(out_shape, np.nan)
    s0, s1 = np.arange(n) / n, np.arange(1, n + 1) / n
    b0, b1 = np.arange(n_bins) / n_bins, np.arange(1, n_bins + 1) / n_bins
    w = np.clip(np.minimum(s1[:, None], b1[None]) - np.maximum(s0[:, None], b0[None]), 0, None)  # [n, K]
    ok = ~np.isnan(v)
    flat_v, flat_ok = np.where(ok, v, 0).reshape(n, -1), ok.reshape(n, -1).astype(np.float64)
    num, den = w.T @ flat_v, w.T @ flat_ok
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan).reshape(out_shape)


@contextlib.contextmanager
def quiet_nan_warnings():
    """Silences numpy's RuntimeWarnings (mean of empty slice, ...): NaN already says "undefined" in the results."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def attention_means(res: CollectionAnalysis) -> dict[str, np.ndarray]:
    """Means over every rollout step (NaN where nothing was defined) of the attention summaries, keyed
    ``"{part}:{series}"``: part "actions" [S, L] (action queries per denoising step), "state" [L] (pi0's state query,
    once: the same at every denoising step), "heads" [L, heads]; series "text" (mass on the text content keys),
    "normalised" (that mass / the text share of the visible keys), "bos" (mass on BOS). {} when none was computed."""
    out = {}
    for k, total in res.attention.items():
        if ":" in k and not k.startswith(("n:", "state_step_spread:")):
            n = res.attention["n:" + k]
            with np.errstate(all="ignore"):
                out[k] = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    return out


def summary_value(res: CollectionAnalysis, stream: str, metric: str) -> Mapping[str, Any]:
    """JSON-ready per-layer summary of one (stream, metric): values, CIs, n, or None with the reason."""
    if not res.has(stream, metric):
        return {"per_layer": None, "reason": res.reason(stream, metric)}
    cis = res.per_layer(stream, metric)
    return {
        "layers": res.layers(stream),
        "per_layer": [c.estimate for c in cis],
        "ci_low": [c.low for c in cis],
        "ci_high": [c.high for c in cis],
        "n_episodes": [c.n for c in cis],
        "n_tasks": [c.n_clusters for c in cis],
        "unit_of_resampling": cis[0].unit if cis else None,
        "correction": "none (per-layer 95% intervals, not simultaneous)",
        "bf16_floor": _floor(res, stream, metric),
    }


def _floor(res: CollectionAnalysis, stream: str, metric: str) -> list[float] | str | None:
    """The metric's bf16 precision floor per layer (None: the metric has no floor; a string: why it is n/a)."""
    from openpi.latents.analysis.measures.precision_floor import FLOOR_METRICS

    if metric not in FLOOR_METRICS:
        return None
    if stream not in res.precision_floor:
        return "n/a: the states are not stored in bfloat16"
    return [f.get(metric, float("nan")) for f in res.precision_floor[stream]]


def pooled_values(res: CollectionAnalysis, stream: str, metric: str, extra: str | None = None) -> np.ndarray:
    """[layers] a pooled metric's value per stored layer (or its named ``extra``), NaN where not computed."""
    vals = res.pooled.get((stream, metric)) or []
    out = np.full(len(vals), np.nan)
    for j, v in enumerate(vals):
        x = None if v is None else (v.value if extra is None else v.extra.get(extra))
        if isinstance(x, int | float | np.floating | np.integer):
            out[j] = float(x)
    return out
