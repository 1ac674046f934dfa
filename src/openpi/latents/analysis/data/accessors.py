"""Notebook accessors: one layer or one rollout step of a stream at a time, over any source
(:func:`openpi.latents.analysis.data.source.make_source`: a store, lazy task views, pickles or in-memory task dicts)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from openpi.latents import schema
from openpi.latents.analysis.data.source import make_source

_STREAM_KEYS = {
    "text_only": ("text_only_hidden_states",),
    "expert_0": ("expert_0_hidden_states", "expert_0_segment_means"),
    "expert_1": ("expert_1_hidden_states", "expert_1_segment_means"),
}


def _task_id(source, task_data) -> int:
    if isinstance(task_data, Mapping) and "task_id" in task_data:
        return int(task_data["task_id"])
    ids = source.task_ids()
    if len(ids) != 1:
        raise ValueError(f"task data holds tasks {ids}; pass one task's data")
    return ids[0]


def _episode_index(episode) -> int:
    return int(episode.split("_", 1)[1]) if isinstance(episode, str) else int(episode)


def resolve_key(fields: Mapping[str, Any], expert_type: str, counterfactual: bool = False) -> str:
    """The stored key behind ``expert_type`` (a stream name, or a stored key itself), ``cf_`` prefixed if asked."""
    prefix = schema.CF_PREFIX if counterfactual else ""
    for key in _STREAM_KEYS.get(expert_type, (expert_type,)):
        if prefix + key in fields:
            return prefix + key
    wanted = [prefix + k for k in _STREAM_KEYS.get(expert_type, (expert_type,))]
    raise KeyError(f"no {wanted} in this episode; it holds {sorted(fields)}")


def rollout_steps(task_data, episode) -> list[int]:
    """Env timesteps t of an episode's rollout steps (the ``step_{t}`` keys), in rollout order."""
    source = make_source(task_data)
    return source.step_t(_task_id(source, task_data), _episode_index(episode))


def get_layer_across_steps(
    task_data, episode, layer_idx: int, expert_type: str, *, steps=None, counterfactual: bool = False
) -> np.ndarray:
    """One layer of one stream across an episode's rollout steps, as one array ``[steps, ...]`` (layer axis removed).

    ``expert_type``: "text_only", "expert_0", "expert_1" (the stored hidden-state key of that stream, full or pooled)
    or any stored key with a layer axis (e.g. "attention_to_text"). ``layer_idx`` indexes the stored layers.
    ``steps``: rollout-step indices (default all; for counterfactual keys, the steps that have a rerun).
    From a store only that layer's chunks are read.
    """
    source = make_source(task_data)
    t, k = _task_id(source, task_data), _episode_index(episode)
    key = resolve_key(source.fields(t, k), expert_type, counterfactual)
    if steps is None and counterfactual:
        steps = source.present_steps(t, k, key)
    return source.read(t, k, key, layer=layer_idx, steps=steps)


def get_hidden_states_for_dimensions(
    task_data, episode_idx, rollout_step, layer_idx: int, expert_type: str, *, counterfactual: bool = False
) -> np.ndarray:
    """Hidden states of one layer at one rollout step: text_only [B, T, W], expert_0 [B, Tp or segments, W],
    expert_1 [S, B, Ts or 2, W] (S = captured denoising steps).

    ``episode_idx``: k or "episode_k"; ``rollout_step``: the env timestep t of the key ``step_{t}`` (int or the key).
    """
    source = make_source(task_data)
    t, k = _task_id(source, task_data), _episode_index(episode_idx)
    wanted = _episode_index(rollout_step)
    step_t = source.step_t(t, k)
    if wanted not in step_t:
        raise KeyError(f"episode {k} has no rollout step step_{wanted}; steps are {[f'step_{s}' for s in step_t]}")
    return get_layer_across_steps(
        task_data, k, layer_idx, expert_type, steps=[step_t.index(wanted)], counterfactual=counterfactual
    )[0]
