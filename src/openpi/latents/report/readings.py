"""One line per figure saying what it shows for this collection (report.md and the CLI's summary)."""

from __future__ import annotations

import numpy as np

from openpi.latents.analysis.data.streams import STREAMS
from openpi.latents.analysis.run.result import CollectionAnalysis, quiet_nan_warnings
from openpi.latents.report.notes import cf_text_positions
from openpi.latents.report.notes import fmt as _fmt


def _text(res: CollectionAnalysis) -> str:
    if not res.has("text_only", "text_accuracy"):
        return f"Text reconstruction not computed: {res.reason('text_only', 'language_loss')}."
    acc = [c.estimate for c in res.per_layer("text_only", "text_accuracy")]
    layers = res.layers("text_only")
    lo = int(np.nanargmin(acc))
    nll = [c.estimate for c in res.per_layer("text_only", "logit_nll")]
    return (
        f"Text reconstruction accuracy is {_fmt(acc[0], 2)} at layer {layers[0]} and {_fmt(acc[-1], 2)} "
        f"at layer {layers[-1]} (lowest {_fmt(acc[lo], 2)} at layer {layers[lo]}); the same-position "
        f"logit lens gives NLL {_fmt(nll[0], 2)} → {_fmt(nll[-1], 2)} nats."
    )


def _sensitivity(res: CollectionAnalysis) -> str:
    parts = []
    for s in STREAMS:
        if res.has(s, "prompt_sensitivity"):
            v = [c.estimate for c in res.per_layer(s, "prompt_sensitivity")]
            j = int(np.nanargmax(v))
            parts.append(f"{s} peaks at {_fmt(v[j])} (layer {res.layers(s)[j]})")
    ad = res.action_divergence_per_episode()
    pos = cf_text_positions(res)
    if res.has("text_only", "prompt_sensitivity") and pos:
        parts.append(
            f"text_only compares {_fmt(pos['mean'], 1)} position(s) per rerun on average (the positions holding the "
            "same token under both prompts; with a blank counterfactual only BOS: a one-position measure)"
        )
    return (
        "Prompt sensitivity: " + "; ".join(parts) + "."
        if parts
        else "Prompt sensitivity not available: no counterfactual reruns."
    ) + (
        f" Action chunks move by {_fmt(float(np.nanmean(ad)))} (mean L2 per chunk step) under the counterfactual "
        "prompt."
        if np.any(~np.isnan(ad))
        else ""
    )


def _probe(res: CollectionAnalysis) -> str:
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
    return (
        "Task probe: " + "; ".join(parts) + ". The task id can also be read off the scene, so compare "
        "with prompt sensitivity before calling it language."
        if parts
        else f"Task probe not run: {res.missing.get('probe', 'disabled')}."
    )


def _drift(res: CollectionAnalysis) -> str:
    metric = "centred_drift" if any(res.has(s, "centred_drift") for s in STREAMS) else "drift"
    parts = [f"{s} {_fmt(float(np.nanmean(res.per_episode(s, metric)[:, -1])))}" for s in STREAMS if res.has(s, metric)]
    if not parts:
        return "Drift not computed: no hidden-state stream captured."
    last = ((res.source.get("denoise_steps") or {}).get("ids") or [None])[-1]
    return (
        f"Mean {metric.replace('_', ' ')} from the first rollout step at the last captured layer: "
        + ", ".join(parts)
        + "."
        + (
            f" expert_1 drift is measured at the last captured denoising step ({last}), closest to the action: "
            "openpi draws fresh noise at every inference, so earlier denoising steps drift by the noise alone."
            if res.has("expert_1", "drift")
            else ""
        )
    )


def _layer_mean(res: CollectionAnalysis, metric: str) -> float | None:
    if not res.has("expert_1", metric):
        return None
    with quiet_nan_warnings():
        return float(np.nanmean([c.estimate for c in res.per_layer("expert_1", metric)]))


def _attention(res: CollectionAnalysis) -> str:
    if not res.has("expert_1", "attention_to_text"):
        return f"Attention to text not computed: {res.reason('expert_1', 'attention_to_text')}."
    v = [c.estimate for c in res.per_layer("expert_1", "attention_to_text")]
    j = int(np.nanargmax(v)) if np.any(~np.isnan(v)) else 0
    which = "every valid text key" if res.settings.get("include_constant_tokens") else "the text (BOS and newline out)"
    text = (
        f"Expert-1 queries put {_fmt(float(np.nanmean(v)))} of their attention on {which} on average, most at layer "
        f"{res.layers('expert_1')[j]} ({_fmt(v[j])})"
    )
    norm, bos = _layer_mean(res, "attention_to_text_normalised"), _layer_mean(res, "attention_to_bos")
    if norm is not None:
        text += f"; {_fmt(norm)}× the text's share of the keys they see (uniform attention = 1)"
    if bos is not None:
        text += f"; BOS alone takes {_fmt(bos)}"
    return text + "."


def _success(res: CollectionAnalysis) -> str:
    n_s, n_f = res.split_counts()
    info = res.split_info()
    n_err = len(info["excluded_errored"])
    window = {
        "common": f"each episode averaged over its first {info['n_inferences']} rollout steps, the fewest any "
        "episode has",
        "all": "each episode averaged over all its rollout steps (length-confounded: failed episodes run longer)",
        "progress": "each episode summarised by normalised progress (secondary view, length-confounded)",
        "step": "compared at equal rollout steps among the episodes still running, within task",
    }[info["window"]]
    errors = f"; {n_err} episode(s) that ended with an error left out" if n_err else ""
    if not (n_s and n_f and res.has("text_only", "language_loss")):
        return f"{n_s} successful / {n_f} failed episodes ({window}{errors})" + (
            "; a success/failure comparison needs both outcomes." if not (n_s and n_f) else "."
        )
    d = res.within_task_split("text_only", "language_loss")
    diffs = [abs(x.difference.estimate) for x in d]
    k = f"{info['n_tasks_both_outcomes']} of {info['n_tasks']} tasks have both outcomes"
    if np.all(np.isnan(diffs)):
        return f"{n_s} successful / {n_f} failed episodes ({window}{errors}); {k}: no within-task gap is defined."
    j = int(np.nanargmax(diffs))
    x = d[j]
    return (
        f"{n_s} successful / {n_f} failed episodes ({window}{errors}); {k}. The largest within-task success − "
        f"failure gap in language loss is {_fmt(x.difference.estimate)} [{_fmt(x.difference.low)}, "
        f"{_fmt(x.difference.high)}] (task bootstrap) at layer {res.layers('text_only')[j]}, within-task "
        f"permutation p = {_fmt(x.p_value, 4)}, Holm-adjusted over {len(d)} layers p = {_fmt(x.p_holm, 4)}."
    )


READINGS = {
    "text": _text,
    "sensitivity": _sensitivity,
    "probe": _probe,
    "drift": _drift,
    "attention": _attention,
    "success": _success,
}


def readings(res: CollectionAnalysis) -> dict[str, str]:
    """One line per figure saying what it shows for this collection."""
    return {name: read(res) for name, read in READINGS.items()}
