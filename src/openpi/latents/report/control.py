"""The control collection in the report: its values beside the trained model's in every per-layer figure
(dashed), in metrics.json (``control`` under each metric and stream) and in each figure's statistics line.

The control (``--control``, ``CollectionAnalysis.control``) is another collection analysed with the same settings;
the matched one is :mod:`openpi.latents.replay`'s: this collection's observations and noise re-run through a
random-initialised model of the same config (or a second checkpoint). :func:`matching` says which it is, from the
control's manifest (``control_of.content_hash`` equal to this collection's ``content_hash``): only a matched control
differs from this model by the weights alone. Values are aligned by layer id (NaN where the control lacks a layer).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from openpi.latents.analysis.metrics import registry as R
from openpi.latents.analysis.run.result import CollectionAnalysis, attention_means, pooled_values, quiet_nan_warnings
from openpi.latents.report.notes import fmt
from openpi.latents.store.manifest import RunManifest

CONTROL_STYLE = dict(color="0.45", ls="--", lw=1.2)
_STREAMS = ("text_only", "expert_0", "expert_1")


def matching(res: CollectionAnalysis) -> str:
    """How the control relates to this collection (its manifest's ``control_of``)."""
    ctrl = res.control
    if ctrl is None:
        return "no control collection"
    of = RunManifest.of(ctrl.source["manifest"]).control_of or {}
    mine = RunManifest.of(res.source["manifest"]).content_hash
    if of and mine and of.get("content_hash") == mine:
        return "matched replay of this collection (same observations and noise, other weights)"
    if of:
        return f"a replay of another collection ({of.get('store')}): not matched to this one"
    return "a separate collection (not a replay: other observations, so it differs by input as well as weights)"


def summary(res: CollectionAnalysis) -> dict[str, Any] | None:
    """metrics.json's ``control``: what the control collection is (None without one)."""
    ctrl = res.control
    if ctrl is None:
        return None
    man = RunManifest.of(ctrl.source["manifest"])
    return {
        "label": res.control_label,
        "matching": matching(res),
        "root": str(ctrl.source["root"]),
        "checkpoint": man.checkpoint,
        "kind": man.kind,
        "control_of": {k: v for k, v in (man.control_of or {}).items() if k != "arguments"} or None,
        "replay": man.replay,
        "n_tasks": ctrl.source["n_tasks"],
        "n_episodes": len(ctrl.episodes),
    }


def _align(res: CollectionAnalysis, stream: str, control_layers: list[int], values) -> list:
    by_layer = dict(zip(control_layers, values))
    return [by_layer.get(layer) for layer in res.layers(stream)]


def control_cis(res: CollectionAnalysis, stream: str, metric: str) -> list | None:
    """The control's per-layer mean over episodes (``BootstrapCI`` or None per layer of this collection)."""
    ctrl = res.control
    if ctrl is None or stream not in res.streams or not ctrl.has(stream, metric):
        return None
    return _align(res, stream, ctrl.layers(stream), ctrl.per_layer(stream, metric))


def control_estimates(res: CollectionAnalysis, stream: str, metric: str) -> np.ndarray | None:
    cis = control_cis(res, stream, metric)
    return None if cis is None else np.array([np.nan if c is None else c.estimate for c in cis], float)


def control_probe(res: CollectionAnalysis, stream: str) -> np.ndarray | None:
    """The control's task-probe accuracy per layer of this collection."""
    ctrl = res.control
    if ctrl is None or stream not in ctrl.probes or stream not in res.streams:
        return None
    acc = _align(res, stream, ctrl.layers(stream), [p.accuracy for p in ctrl.probes[stream]])
    return np.array([np.nan if a is None else a for a in acc], float)


def control_attention(res: CollectionAnalysis) -> np.ndarray | None:
    """The control's expert-1 attention mass on the text content keys per layer (action queries, mean over denoising
    steps: the series `attention_report` draws per layer)."""
    ctrl = res.control
    both = ctrl is not None and "expert_1" in res.streams and "expert_1" in ctrl.streams
    means = attention_means(ctrl) if both else {}
    if "actions:text" not in means:
        return None
    with quiet_nan_warnings():
        per_layer = np.nanmean(means["actions:text"], axis=0)
    return np.array([np.nan if a is None else a for a in _align(res, "expert_1", ctrl.layers("expert_1"), per_layer)])


def label(res: CollectionAnalysis) -> str:
    return f"control: {res.control_label}"


def draw_line(ax, res: CollectionAnalysis, stream: str, y: np.ndarray | None, color=None, name: str = "") -> None:
    """The control's per-layer values ``y`` dashed on ``ax`` (nothing without them)."""
    if y is None:
        return
    style = {**CONTROL_STYLE, **({"color": color} if color is not None else {})}
    ax.plot(res.layers(stream), y, marker="x", ms=3, label=f"{name}{label(res)}", **style)


def draw_metric(ax, res: CollectionAnalysis, stream: str, metric: str, color=None, name: str = "") -> None:
    draw_line(ax, res, stream, control_estimates(res, stream, metric), color, name)


def draw_success_split(ax, res: CollectionAnalysis, stream: str, metric: str) -> None:
    """The control's success and failure means per layer, dashed in the outcome colours (a matched replay has this
    collection's episodes and outcomes, so it shows what the same split reads off untrained states)."""
    ctrl = res.control
    if ctrl is None or stream not in res.streams or not ctrl.has(stream, metric):
        return
    split = _align(res, stream, ctrl.layers(stream), ctrl.success_split(stream, metric))
    n_s, n_f = ctrl.split_counts()
    for side, n, color in (("success", n_s, "tab:green"), ("failure", n_f, "tab:red")):
        if n:
            y = np.array([np.nan if x is None else getattr(x, side).estimate for x in split], float)
            draw_line(ax, res, stream, y, color, f"{side} ")


def draw_action_divergence(ax, res: CollectionAnalysis) -> None:
    """The control's action divergence per episode as markers over this collection's bars (matched by task and
    episode)."""
    ctrl = res.control
    if ctrl is None or "action_divergence" in ctrl.missing:
        return
    by_ep = dict(zip([(e.task_id, e.episode) for e in ctrl.episodes], ctrl.action_divergence_per_episode()))
    y = [by_ep.get((e.task_id, e.episode), np.nan) for e in res.episodes]
    ax.plot(range(len(y)), y, "x", color=CONTROL_STYLE["color"], label=label(res))
    ax.legend(fontsize=6)


# --------------------------------------------------------------------------------------------------------------------
# metrics.json


def metric_entry(res: CollectionAnalysis, stream: str, metric: str) -> dict[str, Any] | None:
    """``metrics[metric][stream]["control"]``: the control's per-layer values (mean over its episodes, 95% task-
    bootstrap interval) on this collection's layers, and its mean over layers."""
    cis = control_cis(res, stream, metric)
    if cis is None:
        return None
    est = np.array([np.nan if c is None else c.estimate for c in cis], float)
    with quiet_nan_warnings():
        mean = float(np.nanmean(est)) if np.any(~np.isnan(est)) else None
    return {
        "label": res.control_label,
        "matching": matching(res),
        "layers": res.layers(stream),
        "per_layer": list(est),
        "ci_low": [None if c is None else c.low for c in cis],
        "ci_high": [None if c is None else c.high for c in cis],
        "n_episodes": [None if c is None else c.n for c in cis],
        "mean_over_layers": mean,
    }


def add_to_metrics(res: CollectionAnalysis, metrics: dict[str, Any]) -> None:
    """Adds the control's values to metrics.json's ``metrics`` (per-step metrics, task probe, attention, actions)."""
    if res.control is None:
        return
    for m in R.REGISTRY:
        if m.scope == "pooled":
            continue  # pooled_report adds the pooled metrics' control
        for s in _STREAMS:
            entry = metric_entry(res, s, m.name)
            if entry is not None and isinstance(metrics.get(m.name, {}).get(s), dict):
                metrics[m.name][s]["control"] = entry
    for s in _STREAMS:
        acc = control_probe(res, s)
        if acc is not None and isinstance(metrics.get("task_probe", {}).get(s), dict):
            metrics["task_probe"][s]["control"] = {"label": res.control_label, "accuracy": list(acc)}
    att = control_attention(res)
    if att is not None and isinstance(metrics.get("attention_by_denoise_step"), dict):
        metrics["attention_by_denoise_step"]["control"] = {
            "label": res.control_label,
            "action_queries_text_per_layer": list(att),
        }
    ad = _action_divergence(res)
    if ad is not None and isinstance(metrics.get("action_divergence"), dict):
        metrics["action_divergence"]["control"] = {"label": res.control_label, "mean_l2_mean": ad}


def _action_divergence(res: CollectionAnalysis) -> float | None:
    ctrl = res.control
    if ctrl is None or "action_divergence" in ctrl.missing:
        return None
    v = ctrl.action_divergence_per_episode()
    return float(np.nanmean(v)) if np.any(~np.isnan(v)) else None


# --------------------------------------------------------------------------------------------------------------------
# The statistics line of each figure


def _mean(x) -> float:
    x = np.asarray(x, float)
    with quiet_nan_warnings():
        return float(np.nanmean(x)) if x.size and np.any(~np.isnan(x)) else float("nan")


def _item(metric: str, stream: str, statistic: str, control: float, model: float) -> dict[str, Any]:
    return {"metric": metric, "stream": stream, "statistic": statistic, "control": control, "model": model}


def _means_over_layers(res: CollectionAnalysis, pairs) -> list[dict[str, Any]]:
    out = []
    for metric, stream in pairs:
        c = control_estimates(res, stream, metric)
        if c is not None and res.has(stream, metric):
            model = [x.estimate for x in res.per_layer(stream, metric)]
            out.append(_item(metric, stream, "mean over layers", _mean(c), _mean(model)))
    return out


def _at_peak(res: CollectionAnalysis, metric: str, stream: str, model: np.ndarray, control: np.ndarray | None):
    """The control at the layer where this model peaks (the layer the reading names), or None."""
    if control is None or not np.any(~np.isnan(model)):
        return None
    j = int(np.nanargmax(model))
    return _item(metric, stream, f"at layer {res.layers(stream)[j]} (this model's peak)", control[j], model[j])


def _success(res: CollectionAnalysis) -> list[dict[str, Any]]:
    metric, stream = "language_loss", "text_only"
    ctrl = res.control
    if not (res.has(stream, metric) and ctrl.has(stream, metric)) or 0 in res.split_counts():
        return []
    model = np.array([abs(x.difference.estimate) for x in res.within_task_split(stream, metric)], float)
    if not np.any(~np.isnan(model)):
        return []
    j = int(np.nanargmax(model))
    layer = res.layers(stream)[j]
    cd = dict(zip(ctrl.layers(stream), ctrl.within_task_split(stream, metric))).get(layer)
    here = res.within_task_split(stream, metric)[j].difference.estimate
    name = f"within-task success − failure at layer {layer} (this model's largest gap)"
    return [_item(metric, stream, name, np.nan if cd is None else cd.difference.estimate, here)]


def _heatmaps(res: CollectionAnalysis) -> list[dict[str, Any]]:
    out = []
    for metric in R.HEATMAP_METRICS:
        for s in R.BY_NAME[metric].streams:
            if res.has(s, metric) and res.control.has(s, metric):
                c, m = res.control.heatmap_progress(s, metric)[0], res.heatmap_progress(s, metric)[0]
                out.append(_item(metric, s, "mean over layers and progress bins", _mean(c), _mean(m)))
    return out


def _figure_items(res: CollectionAnalysis) -> dict[str, list[dict[str, Any]]]:
    ctrl = res.control
    curves = [(m, s) for m in R.CURVE_METRICS for s in R.BY_NAME[m].streams]
    sens, probe = [], []
    for s in _STREAMS:
        if res.has(s, "prompt_sensitivity"):
            model = np.array([c.estimate for c in res.per_layer(s, "prompt_sensitivity")], float)
            sens.append(_at_peak(res, "prompt_sensitivity", s, model, control_estimates(res, s, "prompt_sensitivity")))
        if s in res.probes:
            acc = np.array([p.accuracy for p in res.probes[s]], float)
            probe.append(_at_peak(res, "task_probe", s, acc, control_probe(res, s)))
    ad = _action_divergence(res)
    if ad is not None and "action_divergence" not in res.missing:
        model = _mean(res.action_divergence_per_episode())
        sens.append(_item("action_divergence", "actions", "mean over episodes", ad, model))
    att = control_estimates(res, "expert_1", "attention_to_text")  # the registry metric, as for this model
    attention = []
    if att is not None and res.has("expert_1", "attention_to_text"):
        model = np.array([c.estimate for c in res.per_layer("expert_1", "attention_to_text")], float)
        attention = [_item("attention_to_text", "expert_1", "mean over layers", _mean(att), _mean(model))]
        attention.append(_at_peak(res, "attention_to_text", "expert_1", model, att))
    pooled = [("token_probe", "text_only", "selectivity"), ("tuned_lens", "text_only", None)]
    geometry = [("effective_rank", s, None) for s in _STREAMS] + [("cka_experts", "expert_1", None)]
    return {
        "overview": _means_over_layers(res, [("language_loss", "text_only"), ("prompt_sensitivity", "expert_1")]),
        "layer_curves": _means_over_layers(res, curves),
        "heatmaps": _heatmaps(res),
        "success_failure": _success(res),
        "probe": probe,
        "prompt_sensitivity": sens,
        "attention_to_text": attention,
        "information": _pooled_items(res, ctrl, pooled),
        "geometry": _pooled_items(res, ctrl, geometry),
    }


def _pooled_items(res: CollectionAnalysis, ctrl: CollectionAnalysis, specs) -> list[dict[str, Any]]:
    out = []
    for metric, stream, extra in specs:
        if (stream, metric) in res.pooled and (stream, metric) in ctrl.pooled:
            c, m = pooled_values(ctrl, stream, metric, extra), pooled_values(res, stream, metric, extra)
            name = f"{metric}{'.' + extra if extra else ''}"
            out.append(_item(name, stream, "mean over layers", _mean(c), _mean(m)))
    return out


def describe(items: list[dict[str, Any]]) -> str:
    """The statistics line's text of a figure's control values."""
    return "; ".join(
        f"{x['stream']} {x['metric']} {x['statistic']}: {fmt(x['control'])} (this model {fmt(x['model'])})"
        for x in items
    )


def figure_controls(res: CollectionAnalysis) -> dict[str, dict[str, Any]]:
    """{figure: {"control": text, "control_collection": {label, matching, values}}} for every figure (empty
    without a control collection): the control's value at the statistic each figure's reading uses."""
    if res.control is None:
        return {}
    out = {}
    for figure, items in _figure_items(res).items():
        items = [x for x in items if x is not None]
        text = describe(items) if items else "the control collection has no value for this figure"
        out[figure] = {
            "control": f"{res.control_label} ({matching(res)}; dashed where drawn): {text}",
            "control_collection": {"label": res.control_label, "matching": matching(res), "values": items},
        }
    return out
