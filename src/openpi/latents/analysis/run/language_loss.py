"""The per-layer "language loss" view of the original notebook API (``expert_data_utils``): ``expert_0`` /
``expert_1`` / ``text_only`` language loss and ``overall_loss``, for one rollout step, a task, or every rollout step
of a task's episodes.

Definitions (per layer l):

* ``text_only_language_loss[l]`` = 1 − text reconstruction accuracy at layer l: the fraction of valid prompt positions
  (``text_mask``) whose state's nearest token embedding by cosine is not the prompt token (text_reconstruction).
* ``overall_loss`` = the mean over layers of ``text_only_language_loss``.
* ``expert_0_language_loss``: expert 0's *image* positions hold no prompt token, so nothing can be decoded there (its
  text positions are the text_only stream). Stand-in: **prompt sensitivity** of expert 0's image states,
  ‖a − b‖/‖a‖ under the counterfactual prompt (same observation and noise), over the image positions of the *valid*
  cameras only (``segment_mask``: a masked camera's states are meaningless but prompt-dependent). It is not a loss:
  higher = the prompt changes the image states more. None (with the reason) when the collection has no
  counterfactual reruns.
* ``expert_1_language_loss``: expert 1 reads no text tokens. Stand-in: **prompt sensitivity** of expert 1 (all tokens)
  against the rerun that differs by the prompt alone — the teacher-forced rerun (``cf_tf_*``) over every captured
  denoising step, else the free-running rerun at denoising step 0 only (later steps carry diverged x_t) — else the
  **attention mass** its queries put on the text content keys (no BOS, no trailing newline); None with the reason
  when neither was captured.

Each result carries ``measures[stream]`` = {"measure", "definition", "higher_means", "reason"} saying which quantity
fills each slot and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from openpi.latents import schema
from openpi.latents.analysis import measures as M
from openpi.latents.analysis.data import streams as src
from openpi.latents.analysis.data.embedding import TokenEmbedding, token_embedding_for_manifest
from openpi.latents.analysis.metrics.registry import BY_NAME
from openpi.latents.analysis.run.driver import analyze_collection
from openpi.latents.analysis.run.result import CollectionAnalysis, quiet_nan_warnings

SLOTS = {
    "text_only": "text_only_language_loss",
    "expert_0": "expert_0_language_loss",
    "expert_1": "expert_1_language_loss",
}
_CHOICES = {
    "text_only": ("language_loss",),
    "expert_0": ("prompt_sensitivity",),
    "expert_1": ("prompt_sensitivity", "attention_to_text"),
}
_WHY = {
    "text_only": "text reconstruction of the prompt tokens",
    "expert_0": "stand-in: expert 0's image positions hold no prompt token to decode",
    "expert_1": "stand-in: expert 1 reads no text tokens",
}


def _measure(stream: str, metric: str | None, reason: str | None) -> dict[str, Any]:
    if metric is None:
        return {"measure": None, "definition": None, "higher_means": None, "reason": reason}
    return {
        "measure": metric,
        "definition": BY_NAME[metric].definition,
        "higher_means": BY_NAME[metric].higher_means,
        "reason": _WHY[stream],
    }


def language_loss_summary(res: CollectionAnalysis) -> dict[str, Any]:
    """Per-layer slots (mean over episodes of each episode's mean over rollout steps) from an analysis."""
    out: dict[str, Any] = {"layers": {}, "measures": {}}
    for stream, slot in SLOTS.items():
        metric = next((m for m in _CHOICES[stream] if res.has(stream, m)), None)
        reasons = [f"{m}: {res.reason(stream, m)}" for m in _CHOICES[stream]]
        out[slot] = None if metric is None else [c.estimate for c in res.per_layer(stream, metric)]
        out["layers"][stream] = res.layers(stream) if stream in res.streams else None
        out["measures"][stream] = _measure(stream, metric, None if metric else "; ".join(reasons))
    loss = out["text_only_language_loss"]
    out["overall_loss"] = None if loss is None else float(np.nanmean(loss))
    if loss is None:
        out["measures"]["overall"] = {"reason": out["measures"]["text_only"]["reason"]}
    return out


def analyze_inference_language_loss(
    task_data, *, embedding: TokenEmbedding | str | None = "auto", **kwargs
) -> dict[str, Any]:
    """Per-layer language loss of a task (or a whole collection): :func:`language_loss_summary` plus per episode.

    ``task_data``: from ``load_inference_task_data`` (lazy store view or a pickle dict) or a store path. The token
    embedding comes from the run manifest's checkpoint; pass ``embedding=`` for pickles (they carry no manifest).
    Extra keyword arguments go to :func:`~openpi.latents.analysis.analyze_collection` (the probe is off: one task
    has no label).
    """
    kwargs.setdefault("probe", False)
    res = analyze_collection(task_data, embedding=embedding, **kwargs)
    out = language_loss_summary(res)
    per_ep: dict[str, Any] = {}
    for i, ep in enumerate(res.episodes):
        entry: dict[str, Any] = {"task_id": ep.task_id, "success": ep.success, "n_steps": ep.n_steps}
        for stream, slot in SLOTS.items():
            metric = out["measures"][stream]["measure"]
            entry[slot] = None if metric is None else res.per_episode(stream, metric)[i].tolist()
        per_ep[
            f"episode_{ep.episode}"
            if len({e.task_id for e in res.episodes}) == 1
            else f"task_{ep.task_id}/episode_{ep.episode}"
        ] = entry
    out["per_episode"] = per_ep
    return out


def analyze_language_loss_across_rollout_steps(
    task_data, *, embedding: TokenEmbedding | str | None = "auto", **kwargs
) -> dict[str, Any]:
    """Language loss per rollout step and layer, per episode, plus the mean over episodes by rollout-step index.

    Returns ``{"episodes": {"episode_k": {"step_t": [...], "<slot>": [steps, layers] list, "overall_loss": [steps]}},
    "by_rollout_step": {"<slot>": [layers, steps]}, "measures": ...}`` with the slots of the module docstring.
    """
    kwargs.setdefault("probe", False)
    res = analyze_collection(task_data, embedding=embedding, **kwargs)
    summary = language_loss_summary(res)
    episodes: dict[str, Any] = {}
    by_step: dict[str, Any] = {}
    for stream, slot in SLOTS.items():
        metric = summary["measures"][stream]["measure"]
        by_step[slot] = None if metric is None else res.heatmap(stream, metric).tolist()
        for i, ep in enumerate(res.episodes):
            name = f"episode_{ep.episode}" if res.source["n_tasks"] == 1 else f"task_{ep.task_id}/episode_{ep.episode}"
            entry = episodes.setdefault(name, {"step_t": list(ep.step_t), "success": ep.success})
            entry[slot] = None if metric is None else res.step_values[(stream, metric)][i].tolist()
            if stream == "text_only":
                v = None if metric is None else res.step_values[(stream, metric)][i]
                with quiet_nan_warnings():
                    entry["overall_loss"] = None if v is None else np.nanmean(v, axis=1).tolist()
    return {
        "episodes": episodes,
        "by_rollout_step": by_step,
        "layers": summary["layers"],
        "measures": summary["measures"],
    }


def _manifest_of(step_data) -> Mapping[str, Any]:
    """The run manifest behind a lazy store view (best effort; {} for plain dicts)."""
    episode = getattr(step_data, "episode", None)
    if episode is not None:
        try:
            from openpi.latents.store.reader import open_store

            return open_store(episode.path.parent.parent).manifest
        except (OSError, ValueError):
            return {}
    return {}


def _step_fields(step_data) -> dict[str, tuple]:
    episode = getattr(step_data, "episode", None)
    if episode is not None:  # a lazy store step: shapes from the episode attrs, arrays read only when used
        return {k: (episode.fields[k].shape, episode.fields[k].dims) for k in step_data}
    return {k: (np.shape(v), schema.dims_for(k, np.ndim(v))) for k, v in step_data.items() if isinstance(v, np.ndarray)}


def _step_embedding(embedding, manifest) -> tuple[TokenEmbedding | None, str | None]:
    emb, why = (embedding, None) if isinstance(embedding, TokenEmbedding) else (None, "no token embedding given")
    if embedding == "auto":
        try:
            emb, why = token_embedding_for_manifest(manifest), None
        except (ValueError, FileNotFoundError, KeyError, OSError) as e:
            why = f"no token embedding: {e}; pass embedding="
    return emb, why


def _step_text(s, step_data, emb, why) -> tuple[list | None, str | None, str | None]:
    if emb is None:
        return None, None, why
    x = src.states(s, step_data[s.key])
    tr = M.text_reconstruction(x, step_data["tokenized_prompt"], step_data["text_mask"], emb.embedding, keep_axes=0)
    return np.atleast_1d(tr.language_loss).tolist(), "language_loss", None


def _expert1_rerun(s, step_data) -> tuple[str, slice] | None:
    """The expert-1 rerun that differs from the baseline by the prompt alone: the teacher-forced one (every captured
    denoising step), else the free-running one at denoising step 0 (t = 1: both runs start from the same noise)."""
    if schema.teacher_forced(s.key) in step_data:
        return schema.teacher_forced(s.key), slice(None)
    times = step_data.get("denoise_times")
    if s.cf_key in step_data and times is not None and np.isclose(float(np.ravel(times)[0]), 1.0):
        return s.cf_key, slice(0, 1)
    return None


def _step_stand_in(stream, s, step_data, reason) -> tuple[list | None, str | None, str | None]:
    rerun = (s.cf_key, slice(None))
    if stream == "expert_1" and s.key is not None:
        rerun = _expert1_rerun(s, step_data) or (None, None)
    if s.key is not None and s.has_cf and rerun[0] in step_data:
        a, b = src.states(s, step_data[s.key])[rerun[1]], src.states(s, step_data[rerun[0]])[rerun[1]]
        mask = None
        if stream == "expert_0":  # image positions of the valid cameras only
            seg = step_data["segment_mask"] if s.segment_mask_stored else None
            mask = src.position_mask(s, src.camera_valid(s, seg, a.shape[1:2]))
        layer_axis = 1 if stream == "expert_1" else 0
        value = np.atleast_1d(M.prompt_sensitivity(a, b, mask=mask, keep_axes=layer_axis)).tolist()
        return value, "prompt_sensitivity", reason
    key = "attention_to_text_content"  # BOS and the trailing newline left out, as in the analysis
    if stream == "expert_1" and key in step_data:
        summary = M.attention_to_language(step_data[key], state_query=s.state_query)
        return summary.per_layer.tolist(), "attention_to_text", reason
    why = "no counterfactual rerun at this step (cf_* keys)"
    if stream == "expert_1":
        why += f" and no {key}" + (" (a store written before it was captured)" if s.attention else "")
    return None, None, why


def analyze_rollout_step(
    step_data: Mapping[str, Any],
    *,
    embedding: TokenEmbedding | str | None = "auto",
    manifest: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The language-loss slots for one rollout step (``task_data[...]["rollout_steps"]["step_t"]``), per layer.

    Uses the step's own arrays (all layers of the keys it needs); the expert stand-ins need the step's ``cf_*`` keys
    (prompt sensitivity) or ``attention_to_text``. ``embedding``: a TokenEmbedding, "auto" (from the manifest of the
    store the step came from, or ``manifest``), or None (text slot None).
    """
    manifest = dict(manifest or _manifest_of(step_data))
    streams, missing = src.discover_streams(_step_fields(step_data), manifest)
    out: dict[str, Any] = {"layers": {}, "measures": {}}
    emb, why = _step_embedding(embedding, manifest)
    for stream, slot in SLOTS.items():
        s = streams.get(stream)
        out["layers"][stream] = None if s is None else list(s.layers)
        value, metric, reason = None, None, missing.get(stream)
        if s is not None and stream == "text_only":
            value, metric, reason = _step_text(s, step_data, emb, why)
        elif s is not None:
            value, metric, reason = _step_stand_in(stream, s, step_data, reason)
        out[slot] = value
        out["measures"][stream] = _measure(stream, metric, reason)
    loss = out["text_only_language_loss"]
    out["overall_loss"] = None if loss is None else float(np.nanmean(loss))
    return out
