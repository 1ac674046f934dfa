"""CSV tables of a :class:`~openpi.latents.analysis.run.result.CollectionAnalysis` (one row per
stream/metric/layer/...).

* ``episodes.csv``: task, episode, success, rollout steps, prompt, counterfactual prompt, error.
* ``per_layer.csv``: per stream, metric and layer, the mean over episodes with its 95% bootstrap interval
  (``layer_ids``: "model" layer ids, or "capture_position" when the manifest could not resolve them).
* ``per_step.csv``: the layer × rollout-step heatmap data (mean over the episodes that reached the step).
* ``per_episode.csv``: each episode's mean over its rollout steps, per stream, metric and layer.
* ``probe.csv``: task probe per stream and layer (accuracy, fold interval, chance, shuffled control, p-value).
* ``success_split.csv``: success / failure means with intervals and their difference, pooled over tasks (default
  window "step": at equal rollout steps among the episodes at risk; ``window_steps``: with window "common" each
  episode averaged over its first that many rollout steps; errored episodes left out).
* ``attention.csv``: expert-1 attention per denoising step and layer — action queries, and pi0's state query (one
  value per layer, repeated on every step's row: it is the same at every step by construction) — of the text content
  mass, the normalised text mass and the BOS mass (``denoise_step``: the denoising-step id from the manifest's
  capture_spec, step 0 = t 1.0; ``capture_position``: its index among the captured steps);
  ``attention_heads.csv``: the same series per layer and head (every query).
* ``action_divergence.csv``: per episode, the action-chunk divergence under the counterfactual prompt.
"""

from __future__ import annotations

import csv
import math
import pathlib

import numpy as np

from openpi.latents.analysis.metrics import registry as R
from openpi.latents.analysis.run.result import CollectionAnalysis
from openpi.latents.report.attention_report import attention_rows

TABLES = (
    "episodes.csv",
    "per_layer.csv",
    "per_step.csv",
    "per_episode.csv",
    "probe.csv",
    "success_split.csv",
    "attention.csv",
    "attention_heads.csv",
    "action_divergence.csv",
)


def _write_csv(path: pathlib.Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow(["" if isinstance(x, float) and math.isnan(x) else x for x in r])


SPLIT_HEADER = [
    "stream",
    "metric",
    "layer",
    "success_mean",
    "success_low",
    "success_high",
    "n_success",
    "failure_mean",
    "failure_low",
    "failure_high",
    "n_failure",
    "difference",
    "difference_low",
    "difference_high",
    "window_steps",
]
PROBE_HEADER = [
    "stream",
    "layer",
    "accuracy",
    "ci_low",
    "ci_high",
    "chance_majority",
    "chance_uniform",
    "shuffled_mean",
    "shuffled_low",
    "shuffled_high",
    "p_value",
    "n_samples",
    "n_groups",
    "n_splits",
]


def _split_row(s: str, m: str, layer: int, x, window: int | None) -> list:
    return [
        s,
        m,
        layer,
        x.success.estimate,
        x.success.low,
        x.success.high,
        x.n_success,
        x.failure.estimate,
        x.failure.low,
        x.failure.high,
        x.n_failure,
        x.difference.estimate,
        x.difference.low,
        x.difference.high,
        "" if window is None else window,
    ]


def _metric_tables(res: CollectionAnalysis, out: pathlib.Path) -> None:
    """per_layer.csv, per_step.csv, per_episode.csv and success_split.csv: one block of rows per (stream, metric)."""
    rows, step_rows, ep_rows, split_rows = [], [], [], []
    window = res.split_window()
    for s, m in sorted(res.step_values):
        layers = res.layers(s)
        for layer, c in zip(layers, res.per_layer(s, m)):
            rows.append([s, m, layer, res.streams[s].layer_kind, c.estimate, c.low, c.high, c.n])
        grid = res.heatmap(s, m)
        for j, layer in enumerate(layers):
            step_rows += [[s, m, layer, i, float(grid[j, i])] for i in range(grid.shape[1])]
        pe = res.per_episode(s, m)
        for i, e in enumerate(res.episodes):
            ep_rows += [
                [e.task_id, e.episode, e.success, s, m, layer, float(pe[i, j])] for j, layer in enumerate(layers)
            ]
        if m in R.HEATMAP_METRICS:
            split_rows += [_split_row(s, m, layer, x, window) for layer, x in zip(layers, res.success_split(s, m))]
    _write_csv(
        out / "per_layer.csv",
        ["stream", "metric", "layer", "layer_ids", "mean", "ci_low", "ci_high", "n_episodes"],
        rows,
    )
    _write_csv(
        out / "per_step.csv", ["stream", "metric", "layer", "rollout_step_index", "mean_over_episodes"], step_rows
    )
    _write_csv(
        out / "per_episode.csv", ["task_id", "episode", "success", "stream", "metric", "layer", "value"], ep_rows
    )
    _write_csv(out / "success_split.csv", SPLIT_HEADER, split_rows)


def _probe_table(res: CollectionAnalysis, out: pathlib.Path) -> None:
    rows = [
        [
            s,
            layer,
            p.accuracy,
            *p.accuracy_ci,
            p.chance_majority,
            p.chance_uniform,
            p.shuffled_mean,
            *p.shuffled_ci,
            p.p_value,
            p.n_samples,
            p.n_groups,
            p.n_splits,
        ]
        for s, ps in res.probes.items()
        for layer, p in zip(res.layers(s), ps)
    ]
    _write_csv(out / "probe.csv", PROBE_HEADER, rows)


def _attention_tables(res: CollectionAnalysis, out: pathlib.Path) -> None:
    head, rows, head_h, rows_h = attention_rows(res)
    _write_csv(out / "attention.csv", head, rows)
    _write_csv(out / "attention_heads.csv", head_h, rows_h)


def write_tables(res: CollectionAnalysis, out: pathlib.Path) -> list[str]:
    """Writes every table of :data:`TABLES` into ``out``; returns their names."""
    eps = res.episodes
    _write_csv(
        out / "episodes.csv",
        ["task_id", "episode", "success", "n_steps", "prompt", "counterfactual_prompt", "error"],
        [[e.task_id, e.episode, e.success, e.n_steps, e.prompt, e.counterfactual_prompt, e.error] for e in eps],
    )
    _metric_tables(res, out)
    _probe_table(res, out)
    _attention_tables(res, out)
    per_ep = res.action_divergence_per_episode()
    mx = [np.nanmax(v) if np.any(~np.isnan(v)) else np.nan for v in res.actions["max_abs"]]
    _write_csv(
        out / "action_divergence.csv",
        ["task_id", "episode", "success", "mean_l2", "max_abs"],
        [[e.task_id, e.episode, e.success, per_ep[i], mx[i]] for i, e in enumerate(eps)],
    )
    return list(TABLES)
