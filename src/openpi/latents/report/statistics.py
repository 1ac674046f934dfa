"""What every figure's numbers rest on: the unit of resampling, the number of tasks / episodes, the correction for
multiple comparisons and the control's value. report.md prints it under each figure; metrics.json carries the same
under ``statistics``. With a control collection (``--control``; :mod:`openpi.latents.report.control`) each figure's
``control`` is the control collection's value at the statistic the figure's reading uses, beside this model's
(``control_collection`` holds the numbers); the within-collection control it replaces stays under
``within_collection_control`` (and in the line, for the probe's shuffled-label and permutation control)."""

from __future__ import annotations

from typing import Any

import numpy as np

from openpi.latents.analysis.run.denoise_sensitivity import METRIC
from openpi.latents.analysis.run.result import CollectionAnalysis
from openpi.latents.report.control import figure_controls
from openpi.latents.report.notes import fmt

STATE_TOKEN_NOTE = (
    "pi0's state token (expert-1 suffix token 0) attends only to the prefix and to itself, and its input does not "
    "depend on the denoising time or x_t, so its stream (and its attention) is identical at every denoising step by "
    "construction: it is shown once, not per denoising step. pi0.5 has no state token (suffix_segment_names: the "
    "first action token and the rest)"
)


def _unit(res: CollectionAnalysis) -> tuple[str, int, int]:
    n_tasks = res.source["n_tasks"]
    unit = "task (cluster bootstrap)" if n_tasks >= 2 else "episode (one task: the interval speaks for it only)"
    return unit, n_tasks, sum(e.n_steps > 0 for e in res.episodes)


def _probe_control(res: CollectionAnalysis) -> str:
    parts = []
    for s, ps in res.probes.items():
        acc = np.array([p.accuracy for p in ps], float)
        if np.all(np.isnan(acc)):
            continue
        j = int(np.nanargmax(acc))
        p = ps[j]
        parts.append(
            f"{s}: best layer {res.layers(s)[j]}, chance {fmt(p.chance_majority, 2)}, shuffled-label logistic "
            f"{fmt(p.shuffled_mean, 2)}, ridge permutation null {fmt(p.permutation_null_mean, 2)} (p = "
            f"{fmt(p.p_value, 4)}, floor {fmt(p.p_floor, 4)}, {p.n_permutations} permutations)"
        )
    return "; ".join(parts) or "n/a"


def _denoise_statistics(res: CollectionAnalysis) -> dict[str, Any]:
    """Unit, sizes, correction and control of the expert-1 per-denoising-step figure (its free-running values)."""
    ds = res.denoise_sensitivity
    free, tf = ds.get("free"), ds.get("teacher_forced")
    n_tasks = 0 if free is None else free.n_tasks
    unit = "task (cluster bootstrap)" if n_tasks >= 2 else "episode (one task: the interval speaks for it only)"
    out = {
        "unit_of_resampling": unit if free is not None and free.reason is None else "n/a (not computed)",
        "n_tasks": n_tasks,
        "n_episodes": 0 if free is None else free.n_episodes,
        "correction": "none: per-cell 95% intervals over denoising steps × layers (not simultaneous)",
    }
    if tf is None or tf.reason is not None:
        out["control"] = f"teacher-forced rerun not available ({'not computed' if tf is None else tf.reason})"
        return out
    layer0 = float(np.nanmax(np.abs(tf.estimate[:, 0]))) if np.isfinite(tf.estimate[:, 0]).any() else float("nan")
    free_last = fmt(free.estimate[-1, -1]) if free is not None and free.reason is None else "n/a"
    out["control"] = (
        f"the teacher-forced rerun (cf_tf_*, the baseline's x_t fed at every step; {tf.n_tasks} tasks, "
        f"{tf.n_episodes} episodes): layer {tf.layers[0]} at most {fmt(layer0)} over steps"
        f"{' (0 by construction)' if tf.first_is_input else ''}; "
        f"layer {tf.layers[-1]} at step {tf.denoise_steps[-1]}: {fmt(tf.estimate[-1, -1])} (free-running {free_last})"
    )
    return out


def _attention_control(res: CollectionAnalysis) -> str:
    def mean(metric: str) -> float:
        if not res.has("expert_1", metric):
            return float("nan")
        v = np.array([c.estimate for c in res.per_layer("expert_1", metric)], float)
        return float(np.nanmean(v)) if np.any(~np.isnan(v)) else float("nan")

    included = res.settings.get("include_constant_tokens", False)
    return (
        "uniform attention over the keys a query sees: text mass / text share of those keys = 1 (this collection: "
        f"{fmt(mean('attention_to_text_normalised'), 2)} averaged over layers; per head in metrics.json "
        "attention_by_denoise_step.normalised.per_head); BOS and the trailing newline "
        + ("included (include_constant_tokens)" if included else "excluded from the text")
        + f", BOS mass reported apart ({fmt(mean('attention_to_bos'), 2)})"
    )


def figure_statistics(res: CollectionAnalysis) -> dict[str, dict[str, Any]]:
    """{figure: {unit_of_resampling, n_tasks, n_episodes, correction, control}} for every figure of the report;
    with a control collection, ``control`` gives its values (:func:`_with_control`)."""
    return _with_control(res, _within_collection(res))


# Figures whose within-collection control carries numbers of its own, kept in the line beside the collection's.
_KEEP_WITHIN = ("probe", "layer_curves", "information", "prompt_sensitivity", "attention_to_text")


def _with_control(res: CollectionAnalysis, stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    for name, ctrl in figure_controls(res).items():
        entry = stats[name]
        within = entry["control"]
        keep = name in _KEEP_WITHIN and within not in (None, "n/a")
        text = ctrl["control"] + (f"; within this collection: {within}" if keep else "")
        stats[name] = {**entry, **ctrl, "control": text, "within_collection_control": within}
    return stats


def _pooled_entry(res: CollectionAnalysis) -> dict[str, Any]:
    """The pooled figures' sample (information, geometry): one value per layer from held-out folds, no resampling."""
    info = res.pooled_info or {}
    unit = f"none: one value per layer, held out by {info['split']}" if "split" in info else "pooled metrics not run"
    return {
        "unit_of_resampling": unit,
        "n_tasks": info.get("n_tasks", res.source["n_tasks"]),
        "n_episodes": info.get("n_episodes", len(res.episodes)),
        "correction": "none (per layer)",
        "control": None,
    }


def _within_collection(res: CollectionAnalysis) -> dict[str, dict[str, Any]]:
    unit, n_tasks, n_eps = _unit(res)
    info = res.split_info()
    base = {"unit_of_resampling": unit, "n_tasks": n_tasks, "n_episodes": n_eps}
    per_layer = "none: per-layer 95% intervals (not simultaneous)"
    perms = res.settings.get("n_permutations", 1000)
    return {
        "overview": {**base, "correction": per_layer, "control": "see the figures below"},
        "layer_curves": {**base, "correction": per_layer, "control": _probe_control(res)},
        "heatmaps": {
            **base,
            "unit_of_resampling": "none (means over episodes per normalised-progress bin)",
            "correction": "n/a",
            "control": "n/a; the count of episodes behind every column is drawn under each heatmap",
        },
        "success_failure": {
            **base,
            "n_tasks_both_outcomes": info["n_tasks_both_outcomes"],
            "n_success": info["n_success"],
            "n_failure": info["n_failure"],
            "correction": f"Holm over layers on the within-task permutation p-values ({perms} permutations, floor "
            f"{fmt(1 / (1 + perms), 4)}) when a layer is picked",
            "control": "within-task comparison (success labels permuted inside each task); the pooled split "
            "drawn is confounded by task",
        },
        "probe": {
            **base,
            "unit_of_resampling": "episode groups (folds grouped by episode; permutations relabel whole episodes)",
            "correction": "none (per layer)",
            "control": _probe_control(res),
        },
        "prompt_sensitivity": {
            **base,
            "correction": per_layer,
            "control": "expert_1 here compares runs that differ by the prompt alone: the teacher-forced rerun "
            "(cf_tf_*) where collected, else denoising step 0 of the free-running rerun; the free-running steps "
            f"beside the teacher-forced ones are in the per-denoising-step section ({METRIC})",
        },
        METRIC: _denoise_statistics(res),
        "attention_to_text": {
            **base,
            "unit_of_resampling": "none (means over rollout steps; per-layer task-bootstrap intervals in "
            "metrics.attention_to_text)",
            "correction": "n/a",
            "control": _attention_control(res),
        },
        "information": {
            **_pooled_entry(res),
            "control": "the token probe's control task (prompt slots relabelled with other slots' tokens): "
            "selectivity = accuracy − control accuracy",
        },
        "geometry": {**_pooled_entry(res), "control": "none within the collection (--control adds a control one)"},
    }


def statistics_line(stats: dict[str, Any]) -> str:
    """One report.md line from a :func:`figure_statistics` entry."""
    extra = ""
    if "n_tasks_both_outcomes" in stats:
        extra = (
            f", {stats['n_tasks_both_outcomes']} with both outcomes (the only ones that contribute within task); "
            f"{stats['n_success']} successes / {stats['n_failure']} failures"
        )
    return (
        f"*Statistics: unit of resampling {stats['unit_of_resampling']}; {stats['n_tasks']} tasks, "
        f"{stats['n_episodes']} episodes{extra}; correction: {stats['correction']}; control: {stats['control']}.*"
    )
