"""``metrics.json`` of a report (strict JSON: NaN is written as null).

* ``source``, ``settings``, ``timings``: what was analysed and how (``source.episodes_without_steps``: episodes that
  ended before their first inference, with their errors; ``source.n_errored``); ``episodes``: task, episode, success,
  steps, error.
* ``streams``: for text_only / expert_0 / expert_1, the stored key, capture mode (full / pooled / text), layers and
  whether they are model layer ids or capture positions, expert_0's cameras and where their validity came from;
  ``missing``: {what: reason} for everything that could not be computed; ``notes``: {what: note} for labels or
  camera masks not read off the manifest / records.
* ``metrics[metric][stream]``: for *every* registered metric and *every* stream, either ``{"layers", "per_layer",
  "ci_low", "ci_high", "n_episodes"}`` (mean over episodes of per-episode means, 95% bootstrap interval over episodes)
  or ``{"per_layer": null, "reason": ...}``. Also ``task_probe[stream]`` (one entry per layer, with chance and the
  shuffled control), ``success_relation[metric][stream]`` (per layer: success / failure / difference with
  intervals) and ``success_split`` (its window: the first ``n_inferences`` rollout steps of every episode by default,
  and the errored episodes it leaves out), ``attention_by_denoise_step`` (per series — text content mass, that mass
  normalised by the text share of the visible keys, BOS mass — the action queries [S, L] with rows labelled by
  denoising-step id, pi0's state query once [L], and every head [L, heads]; with the definitions),
  ``action_divergence``, ``prompt_sensitivity_by_denoise_step`` (expert 1, [S][L] per variant: free-running
  ``cf_`` and teacher-forced ``cf_tf_``, with task-bootstrap intervals, or the reason a variant is missing).
* ``language_loss``: the per-layer ``expert_0`` / ``expert_1`` / ``text_only`` language loss of the original notebook
  API, ``overall_loss`` and which measure fills each slot (:mod:`openpi.latents.analysis.run.language_loss`).
* ``control``: the control collection (``--control``): label, how it matches this collection, its checkpoint and
  ``control_of``; its values sit under ``control`` in each metric's entry (``report.control``) and in ``statistics``.
* ``definitions``: one line per metric; ``figures``: file, grid, panel titles and pixel size of every PNG.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from openpi.latents.analysis.data.streams import STREAMS
from openpi.latents.analysis.metrics import registry as R
from openpi.latents.analysis.run.denoise_sensitivity import DEFINITION as DENOISE_DEFINITION
from openpi.latents.analysis.run.denoise_sensitivity import METRIC as DENOISE_METRIC
from openpi.latents.analysis.run.language_loss import language_loss_summary
from openpi.latents.analysis.run.result import CollectionAnalysis, summary_value
from openpi.latents.analysis.stats.clustered import cluster_bootstrap_ci, pooled_split_by_task
from openpi.latents.analysis.stats.equal_step import pooled_equal_step
from openpi.latents.report import control
from openpi.latents.report.attention_report import attention_json
from openpi.latents.report.denoise_report import denoise_json
from openpi.latents.report.notes import SPLIT_NOTE, cf_text_positions
from openpi.latents.report.pooled_report import pooled_json
from openpi.latents.report.statistics import STATE_TOKEN_NOTE, figure_statistics
from openpi.latents.store.manifest import RunManifest, to_json_compatible

MANIFEST_KEYS = (
    "preset",
    "checkpoint",
    "suite",
    "capture_spec",
    "model_config",
    "text_start",
    "segment_names",
    "code_version",
    "content_hash",
)


def _manifest_summary(manifest: RunManifest) -> dict[str, Any]:
    """The manifest fields metrics.json repeats (None where the manifest lacks one)."""
    return {k: to_json_compatible(getattr(manifest, k)) for k in MANIFEST_KEYS}


def clean(v: Any) -> Any:
    """``v`` as strict JSON values: numpy scalars and arrays to Python, NaN / inf to None."""
    if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if isinstance(v, np.ndarray):
        return clean(v.tolist())
    if isinstance(v, (np.floating, float)):
        return None if math.isnan(float(v)) or math.isinf(float(v)) else float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def _ci(c) -> dict[str, Any]:
    return {
        "estimate": c.estimate,
        "low": c.low,
        "high": c.high,
        "n": c.n,
        "unit_of_resampling": c.unit,
        "n_tasks": c.n_clusters,
    }


def _within(x) -> dict[str, Any]:
    return {
        "difference": _ci(x.difference),
        "p_value": x.p_value,
        "p_holm": x.p_holm,
        "p_floor": x.p_floor,
        "n_permutations": x.n_permutations,
        "n_tasks": x.n_tasks,
        "n_tasks_contributing": x.n_tasks_contributing,
        "n_success": x.n_success,
        "n_failure": x.n_failure,
        "per_task": {str(k): {"difference": v[0], "n_success": v[1], "n_failure": v[2]} for k, v in x.per_task.items()},
        "at_risk": x.at_risk.to_dict() if getattr(x, "at_risk", None) is not None else None,
    }


def _probe_entry(layer: int, p) -> dict[str, Any]:
    return {
        "layer": layer,
        "accuracy": p.accuracy,
        "accuracy_ci": list(p.accuracy_ci),
        "chance_majority": p.chance_majority,
        "chance_uniform": p.chance_uniform,
        "shuffled_mean": p.shuffled_mean,
        "shuffled_ci": list(p.shuffled_ci),
        "p_value": p.p_value,
        "p_floor": p.p_floor,
        "n_permutations": p.n_permutations,
        "p_value_test": p.p_value_test,
        "permutation_accuracy": p.permutation_accuracy,
        "permutation_null_mean": p.permutation_null_mean,
        "shuffled_p_value": p.shuffled_p_value,
        "n_splits": p.n_splits,
        "n_samples": p.n_samples,
        "n_groups": p.n_groups,
        "n_classes": p.n_classes,
        "notes": list(p.notes),
        "reason": p.reason,
    }


def _task_probe(res: CollectionAnalysis) -> dict[str, Any]:
    out = {}
    for s in STREAMS:
        if s in res.probes:
            out[s] = {"per_layer": [_probe_entry(layer, p) for layer, p in zip(res.layers(s), res.probes[s])]}
        else:
            why = (
                res.missing.get("probe")
                or res.missing.get(s)
                or ("the probe was disabled" if s in res.streams else "stream not captured")
            )
            out[s] = {"per_layer": None, "reason": why}
    return out


def _success_relation(res: CollectionAnalysis) -> dict[str, Any]:
    success: dict[str, Any] = {}
    for m in R.HEATMAP_METRICS:
        success[m] = {}
        for s in STREAMS:
            if not res.has(s, m):
                success[m][s] = {"per_layer": None, "reason": res.reason(s, m)}
                continue
            success[m][s] = {
                "layers": res.layers(s),
                "per_layer": [
                    {
                        "success": _ci(x.success),
                        "failure": _ci(x.failure),
                        "difference": _ci(x.difference),
                        "within_task": _within(w),
                    }
                    for x, w in zip(res.success_split(s, m), res.within_task_split(s, m))
                ],
                "correction": "Holm over layers (within_task.p_holm)",
            }
    return success


def _action_divergence(res: CollectionAnalysis) -> dict[str, Any]:
    if "action_divergence" in res.missing:
        return {"reason": res.missing["action_divergence"]}
    per_ep = res.action_divergence_per_episode()
    keep = res.split_mask()
    flags = np.array([e.success for e in res.episodes])[keep]
    nb, seed, tasks = res.settings.stats.n_boot, res.settings.stats.seed, res.task_ids()
    if res.settings.stats.success_window == "step":  # at equal rollout steps (analysis.stats.equal_step)
        series = [v for v, k in zip(res.actions["mean_l2"], keep) if k]
        split = pooled_equal_step(series, flags, tasks[keep])
    else:
        window = res.action_divergence_per_episode(res.split_window())[keep]
        split = pooled_split_by_task(window, flags, tasks[keep], n_boot=nb, seed=seed)
    return {
        "mean_l2": _ci(cluster_bootstrap_ci(per_ep, tasks, n_boot=nb, seed=seed)),
        "success_split": {k: _ci(getattr(split, k)) for k in ("success", "failure", "difference")},
        "per_episode": per_ep,
    }


def _streams(res: CollectionAnalysis) -> dict[str, Any]:
    out = {}
    for s, st in res.streams.items():
        out[s] = {
            "key": st.key,
            "mode": st.mode,
            "layers": list(st.layers),
            "layer_ids": st.layer_kind,
            "counterfactual": st.has_cf,
            "attention_to_text": st.attention,
        }
        if s == "expert_1":
            out[s]["state_query"] = {"present": st.state_query, "from": st.state_query_source}
        if s == "expert_0":
            out[s] |= {
                "n_cams": st.n_cams,
                "tokens_per_camera": st.tokens_per_camera if st.mode == "full" else None,
                "camera_validity": "segment_mask" if st.segment_mask_stored else "all cameras assumed valid",
            }
    return out


def metrics_json(res: CollectionAnalysis) -> dict[str, Any]:
    """The content of metrics.json (before :func:`clean`), figures and tables left out."""
    metrics: dict[str, Any] = {
        m.name: {s: summary_value(res, s, m.name) for s in STREAMS} for m in R.REGISTRY if m.scope != "pooled"
    }
    metrics |= pooled_json(res)  # the pooled metrics (token probe, tuned lens, CKA, effective rank)
    for s in ("expert_0", "expert_1"):  # the scene-aware chance beside the pair accuracy (metrics.prompt_decoding)
        entry = metrics.get("prompt_decoding", {}).get(s)
        if isinstance(entry, dict) and entry.get("per_layer") is not None:
            summaries = [res.shared.get(("prompt_decoding_summary", s, j)) for j in range(len(res.layers(s)))]
            entry["scene_chance"] = [None if x is None else x.scene_chance for x in summaries]
    metrics["task_probe"] = _task_probe(res)
    metrics["success_relation"] = _success_relation(res)
    metrics["success_split"] = {**res.split_info(), "note": SPLIT_NOTE}
    stats = figure_statistics(res)
    metrics["statistics"] = stats
    metrics["attention_by_denoise_step"] = attention_json(res)
    metrics["action_divergence"] = _action_divergence(res)
    metrics[DENOISE_METRIC] = denoise_json(res)  # expert 1 per denoising step: free-running vs teacher-forced
    control.add_to_metrics(res, metrics)  # the control collection's values, under "control" (report.control)
    return {
        "source": {
            **{k: v for k, v in res.source.items() if k != "manifest"},
            "manifest": _manifest_summary(RunManifest.of(res.source["manifest"])),
            "success_rate": float(np.mean([e.success for e in res.episodes])),
            "text_only_cf_positions": cf_text_positions(res),
        },
        "settings": res.settings.flat(),
        "timings": res.timings,
        "episodes": [
            {"task_id": e.task_id, "episode": e.episode, "success": e.success, "n_steps": e.n_steps, "error": e.error}
            for e in res.episodes
        ],
        "streams": _streams(res),
        "missing": res.missing,
        "notes": {**res.notes, "state_token": STATE_TOKEN_NOTE},
        "statistics": stats,
        "control": control.summary(res),
        "definitions": {m.name: m.definition for m in R.REGISTRY}
        | R.OTHER_DEFINITIONS
        | {DENOISE_METRIC: DENOISE_DEFINITION},
        "metrics": metrics,
        "language_loss": language_loss_summary(res),
    }
