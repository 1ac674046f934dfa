"""What :func:`openpi.latents.analysis.analyze_collection` returns, and its summaries over episodes.

* ``step_values[(stream, metric)]``: one float array [rollout steps, layers] per episode (NaN where undefined), for
  every metric of :data:`openpi.latents.analysis.registry.REGISTRY` that applies.
* ``probes[stream]``: one :class:`ProbeResult` per layer (task id from the stream's pooled features, folds grouped
  by episode, chance and shuffled control).
* ``attention``: [S, L] sums over all rollout steps (all queries / state query / action queries, and their count),
  for the heatmap (:func:`attention_means`); ``attention["denoise_steps"]`` the denoising-step id of each row.
* ``actions``: per episode [steps] action-chunk divergence (mean L2 over the chunk) under the counterfactual prompt.

Summaries over episodes (:meth:`CollectionAnalysis.per_layer`, :meth:`heatmap`, :meth:`success_split`) treat the
episode as the unit: a metric is first averaged over an episode's rollout steps (``drift`` without step 0, which is
0 by definition), then bootstrapped over episodes. The success split (:meth:`success_split`) leaves out episodes that
ended with an error and, by default (``success_window="common"``), averages every episode over the same window: the
first N rollout steps, N = the fewest steps of any episode in the split. Failed episodes run to max_steps while
successful ones stop early, and per-step metrics such as drift grow with t, so whole-episode means would differ by
episode length alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from openpi.latents.analysis import metrics as M
from openpi.latents.analysis import streams as S
from openpi.latents.analysis.registry import BY_NAME, NOT_APPLICABLE


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
    # work shared by one metric across the episodes of a layer (collection-level fits such as prompt decoding)
    shared: dict[Any, Any] = dataclasses.field(default_factory=dict)

    def has(self, stream: str, metric: str) -> bool:
        return (stream, metric) in self.step_values

    def layers(self, stream: str) -> list[int]:
        return list(self.streams[stream].layers)

    def reason(self, stream: str, metric: str) -> str | None:
        """Why ``metric`` has no values for ``stream`` (None when it has)."""
        if self.has(stream, metric):
            return None
        if stream not in BY_NAME[metric].streams:
            return NOT_APPLICABLE["attention" if metric == "attention_to_text" else stream]
        if stream not in self.streams:
            return self.missing.get(stream, "stream not captured")
        return self.missing.get(f"{stream}.{metric}", "not computed")

    def per_episode(self, stream: str, metric: str, n_steps: int | None = None) -> np.ndarray:
        """[episodes, layers]: each episode's mean over its rollout steps, or over its first ``n_steps`` only (drift:
        without step 0, which is 0 by definition; NaN for an episode without a value)."""
        out = []
        for v in self.step_values[(stream, metric)]:
            v = v if n_steps is None else v[:n_steps]
            v = v[1:] if metric == "drift" else v
            with quiet_nan_warnings():
                out.append(np.nanmean(v, axis=0) if len(v) else np.full(v.shape[1], np.nan))
        return np.asarray(out)

    def per_layer(self, stream: str, metric: str, *, n_boot: int | None = None) -> list[M.BootstrapCI]:
        """Per layer: mean over episodes of :meth:`per_episode`, with a bootstrap interval over episodes."""
        pe = self.per_episode(stream, metric)
        nb = self.settings["n_boot"] if n_boot is None else n_boot
        return [M.bootstrap_ci(pe[:, j], n_boot=nb, seed=self.settings["seed"]) for j in range(pe.shape[1])]

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
        """Rollout steps each episode is averaged over in the success split: None (all its steps) for
        ``window="all"``; for "common" (the default setting) the fewest steps of any episode in the split."""
        window = window or self.settings.get("success_window", "common")
        if window not in ("common", "all"):
            raise ValueError(f"success window must be 'common' or 'all', got {window!r}")
        if window == "all":
            return None
        n = [e.n_steps for e, k in zip(self.episodes, self.split_mask()) if k]
        return min(n) if n else None

    def split_info(self, window: str | None = None) -> dict[str, Any]:
        """What the success split compares: window, steps, episodes left out (errors) and the counts per side."""
        window = window or self.settings.get("success_window", "common")
        n_s, n_f = self.split_counts()
        errored = [e for e in self.episodes if e.error is not None]
        return {
            "window": window,
            "n_inferences": self.split_window(window),
            "n_success": n_s,
            "n_failure": n_f,
            "excluded_errored": [
                {"task_id": e.task_id, "episode": e.episode, "n_steps": e.n_steps, "error": e.error} for e in errored
            ],
        }

    def success_split(self, stream: str, metric: str, window: str | None = None) -> list[M.SuccessSplit]:
        """Per layer: successful vs failed episodes (errored episodes left out), each averaged over the window of
        :meth:`split_window` (default: the rollout steps every episode of the split has)."""
        pe = self.per_episode(stream, metric, n_steps=self.split_window(window))
        keep = self.split_mask()
        flags = np.array([e.success for e in self.episodes])[keep]
        s = self.settings
        return [M.split_by_success(pe[keep, j], flags, n_boot=s["n_boot"], seed=s["seed"]) for j in range(pe.shape[1])]

    def action_divergence_per_episode(self, n_steps: int | None = None) -> np.ndarray:
        """[episodes] mean over the reruns (among the first ``n_steps`` rollout steps) of the action divergence."""
        with quiet_nan_warnings():
            return np.array(
                [np.nanmean(v[:n_steps]) if np.any(~np.isnan(v[:n_steps])) else np.nan for v in self.actions["mean_l2"]]
            )


@contextlib.contextmanager
def quiet_nan_warnings():
    """Silences numpy's RuntimeWarnings (mean of empty slice, ...): NaN already says "undefined" in the results."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def attention_means(res: CollectionAnalysis) -> dict[str, np.ndarray]:
    """[S, L] mean attention mass (all queries / state query / action queries) over every rollout step."""
    if "count" not in res.attention:
        return {}
    cnt = res.attention["count"]
    with np.errstate(all="ignore"):
        return {k: res.attention[k] / cnt for k in ("all", "state", "actions")}


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
    }
