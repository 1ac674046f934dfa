"""The report folder of an analysis: ``metrics.json``, CSV tables, PNG figures and ``report.md``.

``metrics.json`` (strict JSON: NaN is written as null):

* ``source``, ``settings``, ``timings``: what was analysed and how (``source.episodes_without_steps``: episodes that
  ended before their first inference, with their errors; ``source.n_errored``); ``episodes``: task, episode, success,
  steps, error.
* ``streams``: for text_only / expert_0 / expert_1, the stored key, capture mode (full / pooled / text), layers and
  whether they are model layer ids or capture positions, expert_0's cameras and where their validity came from;
  ``missing``: {what: reason} for everything that could not be computed; ``notes``: {what: note} for labels or
  camera masks not read off the manifest / records.
* ``metrics[metric][stream]``: for *every* metric and *every* stream, either ``{"layers", "per_layer", "ci_low",
  "ci_high", "n_episodes"}`` (mean over episodes of per-episode means, 95% bootstrap interval over episodes) or
  ``{"per_layer": null, "reason": ...}``. Also ``task_probe[stream]`` (one entry per layer, with chance and the
  shuffled control), ``success_relation[metric][stream]`` (per layer: success / failure / difference with
  intervals) and ``success_split`` (its window: the first ``n_inferences`` rollout steps of every episode by default,
  and the errored episodes it leaves out), ``attention_by_denoise_step`` ([S, L], rows labelled by denoising-step
  id), ``action_divergence``.
* ``language_loss``: the seed's per-layer ``expert_0`` / ``expert_1`` / ``text_only`` language loss, ``overall_loss``
  and which measure fills each slot (:mod:`openpi.latents.language_loss`).
* ``definitions``: one line per metric; ``figures``: file, grid, panel titles and pixel size of every PNG.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import numpy as np

from openpi.latents import analysis as A
from openpi.latents import analysis_source as src
from openpi.latents import metrics as M
from openpi.latents import report_plots as P
from openpi.latents.language_loss import language_loss_summary
from openpi.latents.report_tables import TABLES, write_tables


def _clean(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.ndarray):
        return _clean(v.tolist())
    if isinstance(v, (np.floating, float)):
        return None if math.isnan(float(v)) or math.isinf(float(v)) else float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def _ci(c) -> dict[str, Any]:
    return {"estimate": c.estimate, "low": c.low, "high": c.high, "n": c.n}


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
        "n_splits": p.n_splits,
        "n_samples": p.n_samples,
        "n_groups": p.n_groups,
        "n_classes": p.n_classes,
        "notes": list(p.notes),
        "reason": p.reason,
    }


def metrics_json(res: A.CollectionAnalysis) -> dict[str, Any]:
    metrics: dict[str, Any] = {m: {s: A.summary_value(res, s, m) for s in src.STREAMS} for m in A.METRICS}
    metrics["task_probe"] = {}
    for s in src.STREAMS:
        if s in res.probes:
            metrics["task_probe"][s] = {
                "per_layer": [_probe_entry(layer, p) for layer, p in zip(res.layers(s), res.probes[s])]
            }
        else:
            why = (
                res.missing.get("probe")
                or res.missing.get(s)
                or ("the probe was disabled" if s in res.streams else "stream not captured")
            )
            metrics["task_probe"][s] = {"per_layer": None, "reason": why}
    success: dict[str, Any] = {}
    for m in P.HEATMAP_METRICS:
        success[m] = {}
        for s in src.STREAMS:
            if not res.has(s, m):
                success[m][s] = {"per_layer": None, "reason": res.reason(s, m)}
                continue
            success[m][s] = {
                "layers": res.layers(s),
                "per_layer": [
                    {"success": _ci(x.success), "failure": _ci(x.failure), "difference": _ci(x.difference)}
                    for x in res.success_split(s, m)
                ],
            }
    metrics["success_relation"] = success
    metrics["success_split"] = {**res.split_info(), "note": SPLIT_NOTE}
    att = A.attention_means(res)
    metrics["attention_by_denoise_step"] = (
        {
            "denoise_steps": res.attention.get("denoise_steps"),
            "denoise_step_ids": (res.source.get("denoise_steps") or {}).get("kind", "capture_position"),
            "denoise_times": res.attention.get("denoise_times"),
            "layers": res.layers("expert_1"),
            **att,
        }
        if att
        else {"reason": res.reason("expert_1", "attention_to_text")}
    )
    if "action_divergence" in res.missing:
        metrics["action_divergence"] = {"reason": res.missing["action_divergence"]}
    else:
        per_ep = res.action_divergence_per_episode()
        keep = res.split_mask()
        window = res.action_divergence_per_episode(res.split_window())[keep]
        flags = np.array([e.success for e in res.episodes])[keep]
        split = M.split_by_success(window, flags, n_boot=res.settings["n_boot"], seed=res.settings["seed"])
        metrics["action_divergence"] = {
            "mean_l2": _ci(M.bootstrap_ci(per_ep, n_boot=res.settings["n_boot"], seed=res.settings["seed"])),
            "success_split": {k: _ci(getattr(split, k)) for k in ("success", "failure", "difference")},
            "per_episode": per_ep,
        }
    streams = {
        s: {
            "key": st.key,
            "mode": st.mode,
            "layers": list(st.layers),
            "layer_ids": st.layer_kind,
            "counterfactual": st.has_cf,
            "attention_to_text": st.attention,
            **(
                {
                    "n_cams": st.n_cams,
                    "tokens_per_camera": st.tokens_per_camera if st.mode == "full" else None,
                    "camera_validity": "segment_mask"
                    if st.segment_mask_stored
                    else ("preset" if st.fallback_segment_mask is not None else "all cameras assumed valid"),
                }
                if s == "expert_0"
                else {}
            ),
        }
        for s, st in res.streams.items()
    }
    return {
        "source": {
            **{k: v for k, v in res.source.items() if k != "manifest"},
            "manifest": {
                k: res.source["manifest"].get(k)
                for k in (
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
            },
            "success_rate": float(np.mean([e.success for e in res.episodes])),
            "text_only_cf_positions": _positions(res),
        },
        "settings": res.settings,
        "timings": res.timings,
        "episodes": [
            {"task_id": e.task_id, "episode": e.episode, "success": e.success, "n_steps": e.n_steps, "error": e.error}
            for e in res.episodes
        ],
        "streams": streams,
        "missing": res.missing,
        "notes": res.notes,
        "definitions": {m: d for m, (_, d) in A.METRICS.items()}
        | {
            "task_probe": "held-out accuracy of a logistic-regression probe of the task id (folds grouped by episode) "
            "with chance and a shuffled-label control",
            "action_divergence": "mean over the chunk of the L2 distance between the action chunks under the prompt "
            "and the counterfactual prompt",
        },
        "metrics": metrics,
        "language_loss": language_loss_summary(res),
    }


# --------------------------------------------------------------------------------------------------------------------
# report.md


SPLIT_NOTE = (
    "success vs failure compares each episode's mean over the first n_inferences rollout steps (the fewest any "
    "episode of the split has): failed episodes run to max_steps while successful ones stop early, and per-step "
    "metrics such as drift grow with t, so whole-episode means would differ by length alone; episodes that ended "
    "with an error are left out"
)
DRIFT_NOTE = (
    "expert_1 drift is taken at the last captured denoising step (closest to the action): openpi draws fresh noise "
    "at every inference, so expert 1 at early denoising steps drifts by the noise alone"
)
TEXT_CF_NOTE = (
    "text_only prompt sensitivity compares only the positions whose token is the same under both prompts; with a "
    "blank counterfactual that is BOS alone, a one-position measure"
)


def _positions(res: A.CollectionAnalysis) -> dict[str, Any] | None:
    v = res.cf_text_positions
    return {"mean": float(np.mean(v)), "min": int(min(v)), "max": int(max(v)), "n_reruns": len(v)} if v else None


def _fmt(x, nd=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def readings(res: A.CollectionAnalysis) -> dict[str, str]:
    """One line per figure saying what it shows for this collection."""
    out = {}
    if res.has("text_only", "text_accuracy"):
        acc = [c.estimate for c in res.per_layer("text_only", "text_accuracy")]
        layers = res.layers("text_only")
        lo = int(np.nanargmin(acc))
        nll = [c.estimate for c in res.per_layer("text_only", "logit_nll")]
        out["text"] = (
            f"Text reconstruction accuracy is {_fmt(acc[0], 2)} at layer {layers[0]} and {_fmt(acc[-1], 2)} "
            f"at layer {layers[-1]} (lowest {_fmt(acc[lo], 2)} at layer {layers[lo]}); the same-position "
            f"logit lens gives NLL {_fmt(nll[0], 2)} → {_fmt(nll[-1], 2)} nats."
        )
    else:
        out["text"] = f"Text reconstruction not computed: {res.reason('text_only', 'language_loss')}."
    parts = []
    for s in src.STREAMS:
        if res.has(s, "prompt_sensitivity"):
            v = [c.estimate for c in res.per_layer(s, "prompt_sensitivity")]
            j = int(np.nanargmax(v))
            parts.append(f"{s} peaks at {_fmt(v[j])} (layer {res.layers(s)[j]})")
    ad = res.action_divergence_per_episode()
    pos = _positions(res)
    if res.has("text_only", "prompt_sensitivity") and pos:
        parts.append(
            f"text_only compares {_fmt(pos['mean'], 1)} position(s) per rerun on average (the positions holding the "
            "same token under both prompts; with a blank counterfactual only BOS: a one-position measure)"
        )
    out["sensitivity"] = (
        "Prompt sensitivity: " + "; ".join(parts) + "."
        if parts
        else "Prompt sensitivity not available: no counterfactual reruns."
    ) + (
        f" Action chunks move by {_fmt(float(np.nanmean(ad)))} (mean L2 per chunk step) under the counterfactual "
        "prompt."
        if np.any(~np.isnan(ad))
        else ""
    )
    parts = []
    for s, ps in res.probes.items():
        acc = np.array([p.accuracy for p in ps])
        if np.all(np.isnan(acc)):
            parts.append(f"{s}: {ps[0].reason}")
            continue
        j = int(np.nanargmax(acc))
        above = sum(1 for p in ps if p.accuracy > p.shuffled_ci[1])
        parts.append(
            f"{s} best {_fmt(acc[j], 2)} at layer {res.layers(s)[j]} (chance {_fmt(ps[j].chance_majority, 2)}, "
            f"shuffled {_fmt(ps[j].shuffled_mean, 2)} [{_fmt(ps[j].shuffled_ci[0], 2)}, "
            f"{_fmt(ps[j].shuffled_ci[1], 2)}]), above the shuffled interval at {above}/{len(ps)} layers"
        )
    out["probe"] = (
        "Task probe: " + "; ".join(parts) + ". The task id can also be read off the scene, so compare "
        "with prompt sensitivity before calling it language."
        if parts
        else f"Task probe not run: {res.missing.get('probe', 'disabled')}."
    )
    parts = [
        f"{s} {_fmt(float(np.nanmean(res.per_episode(s, 'drift')[:, -1])))}" for s in src.STREAMS if res.has(s, "drift")
    ]
    last = ((res.source.get("denoise_steps") or {}).get("ids") or [None])[-1]
    out["drift"] = (
        "Mean drift from the first rollout step at the last captured layer: "
        + ", ".join(parts)
        + "."
        + (
            f" expert_1 drift is measured at the last captured denoising step ({last}), closest to the action: "
            "openpi draws fresh noise at every inference, so earlier denoising steps drift by the noise alone."
            if res.has("expert_1", "drift")
            else ""
        )
        if parts
        else "Drift not computed: no hidden-state stream captured."
    )
    if res.has("expert_1", "attention_to_text"):
        v = [c.estimate for c in res.per_layer("expert_1", "attention_to_text")]
        j = int(np.nanargmax(v))
        out["attention"] = (
            f"Expert-1 queries put {_fmt(float(np.nanmean(v)))} of their attention on the text on "
            f"average, most at layer {res.layers('expert_1')[j]} ({_fmt(v[j])})."
        )
    else:
        out["attention"] = f"Attention to text not captured: {res.reason('expert_1', 'attention_to_text')}."
    n_s, n_f = res.split_counts()
    info = res.split_info()
    n_err = len(info["excluded_errored"])
    window = (
        f"each episode averaged over its first {info['n_inferences']} rollout steps, the fewest any episode has: "
        "failed episodes run longer and per-step metrics such as drift grow with t"
        if info["window"] == "common"
        else "each episode averaged over all its rollout steps (length-confounded: failed episodes run longer)"
    )
    errors = f"; {n_err} episode(s) that ended with an error left out" if n_err else ""
    if n_s and n_f and res.has("text_only", "language_loss"):
        d = res.success_split("text_only", "language_loss")
        diffs = [abs(x.difference.estimate) for x in d]
        if np.all(np.isnan(diffs)):
            out["success"] = f"{n_s} successful / {n_f} failed episodes ({window}{errors}); no defined gap."
        else:
            j = int(np.nanargmax(diffs))
            x = d[j].difference
            out["success"] = (
                f"{n_s} successful / {n_f} failed episodes ({window}{errors}); the largest success − failure gap in "
                f"language loss is {_fmt(x.estimate)} [{_fmt(x.low)}, {_fmt(x.high)}] at layer "
                f"{res.layers('text_only')[j]}."
            )
    else:
        out["success"] = f"{n_s} successful / {n_f} failed episodes ({window}{errors})" + (
            "; a success/failure comparison needs both outcomes." if not (n_s and n_f) else "."
        )
    return out


def report_md(res: A.CollectionAnalysis, figures: dict[str, Any], summary: dict[str, Any]) -> str:
    r = readings(res)
    man = res.source["manifest"]
    n_s = sum(e.success for e in res.episodes)
    no_steps = res.source.get("episodes_without_steps") or []
    lines = [
        "# Language-loss report",
        "",
        f"Collection `{res.source['root']}`: preset `{man.get('preset')}`, checkpoint `{man.get('checkpoint')}`, suite "
        f"`{man.get('suite')}`; {res.source['n_tasks']} tasks, {len(res.episodes)} episodes, {n_s} successful. "
        f"Capture: `{json.dumps(man.get('capture_spec'))}`. Token embedding: `{res.source.get('embedding')}`."
        + (
            f" {res.source.get('n_errored', 0)} episode(s) ended with an error, {len(no_steps)} of them before the "
            "first inference (no rollout step: skipped by every metric; listed under Episodes with errors)."
            if res.source.get("n_errored")
            else ""
        ),
        "",
        "## At a glance",
        "",
        f"![overview]({figures['overview']['file']})",
        "",
    ]
    lines += [f"* {r[k]}" for k in ("text", "sensitivity", "probe", "drift", "attention", "success")]
    slots = summary["measures"]
    lines += [
        "",
        "Seed view (mean over layers): "
        + ", ".join(f"`{s}` = {slots[s]['measure'] or 'none'}" for s in src.STREAMS)
        + f"; overall_loss = {_fmt(summary['overall_loss'])} (mean over layers of the text-only language loss).",
        "",
    ]
    sections = [
        ("layer_curves", "Per-layer curves per stream", "text"),
        ("heatmaps", "Layer × rollout step", "drift"),
        ("success_failure", "Success vs failure", "success"),
        ("probe", "Task decodability", "probe"),
        ("prompt_sensitivity", "Prompt sensitivity", "sensitivity"),
        ("attention_to_text", "Attention to language", "attention"),
    ]
    for name, title, key in sections:
        lines += [f"## {title}", "", r[key], "", f"![{name}]({figures[name]['file']})", ""]
    lines += ["## Definitions", ""] + [f"* **{m}**: {d}" for m, (_, d) in A.METRICS.items()]
    lines += [
        "* **task_probe**: logistic-regression probe of the task id from the stream's pooled features (expert_0: "
        "valid cameras only), folds grouped by episode; chance = majority share; control = labels permuted across "
        "episodes.",
        "",
        "## Method notes",
        "",
        f"* Success split: {SPLIT_NOTE}"
        + (
            f" (this report: first {res.split_window()} rollout steps)."
            if res.settings.get("success_window", "common") == "common"
            else " — this report used the whole-episode window instead (success_window='all')."
        ),
        f"* Drift: {DRIFT_NOTE}.",
        f"* Prompt sensitivity: {TEXT_CF_NOTE}. expert_0 counts only the image positions of valid cameras "
        "(segment_mask; a masked camera's states are meaningless but prompt-dependent).",
        "",
    ]
    if res.notes:
        lines += ["## Labels and masks not read off the manifest", ""]
        lines += [f"* `{k}`: {v}" for k, v in sorted(res.notes.items())] + [""]
    errored = [e for e in res.episodes if e.error is not None]
    if errored:
        lines += ["## Episodes with errors", ""]
        lines += [f"* task {e.task_id} episode {e.episode} ({e.n_steps} rollout steps): {e.error}" for e in errored] + [
            ""
        ]
    if res.missing:
        lines += ["## Not computed", ""] + [f"* `{k}`: {v}" for k, v in sorted(res.missing.items())] + [""]
    lines += [
        "## Files",
        "",
        "`metrics.json` (every metric per layer and stream), " + ", ".join(f"`{t}`" for t in TABLES) + ".",
        "",
    ]
    return "\n".join(lines)


def write_report(res: A.CollectionAnalysis, out_dir: str | pathlib.Path) -> dict[str, Any]:
    """Writes the report folder; returns the metrics.json content."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {name: fn(res, out) for name, fn in P.FIGURES.items()}
    data = metrics_json(res)
    data["figures"] = figures
    data["tables"] = write_tables(res, out)
    (out / "metrics.json").write_text(json.dumps(_clean(data), indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    (out / "report.md").write_text(report_md(res, figures, data["language_loss"]))
    return data
