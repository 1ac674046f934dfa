"""What the analysis reads: a uniform source over a store or seed-style dicts, and the three streams it analyses.

A *source* answers one-layer questions: ``read(task, episode, key, layer=l, steps=[...])`` returns that key's layer
``l`` across the given rollout steps as one array ``[steps, ...]`` (the layer axis removed). Over the zarr store this
reads only that layer's chunks (:meth:`LatentStore.read_array`); over pickled / in-memory seed dicts (already in RAM)
it stacks the steps.

Streams (names used throughout the report):

* ``text_only``: expert 0 at the valid prompt positions, from ``text_only_hidden_states`` [L, B, T, W] (or, if only
  the full prefix was captured, ``expert_0_hidden_states[..., text_start:text_start+T, :]``).
* ``expert_0``: expert 0 at the image positions: the camera segments of ``expert_0_segment_means`` (pooled) or the
  first ``text_start`` tokens of ``expert_0_hidden_states`` (full). The text part of expert 0 is ``text_only``.
* ``expert_1``: the action expert, ``expert_1_segment_means`` [S, L, B, 2, W] (state token, mean of the action
  tokens) or ``expert_1_hidden_states`` [S, L, B, Ts, W]; plus ``attention_to_text`` [S, L, B, heads, Ts].
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from openpi.latents import metrics as M
from openpi.latents import store_format as sf

STREAMS = ("text_only", "expert_0", "expert_1")
CF = "cf_"


class DictSource:
    """Seed-style nested dicts (``{task_id: task_data}``; pickles or :func:`materialize` output), already in RAM."""

    def __init__(self, tasks: Mapping[int, Mapping[str, Any]], manifest: Mapping[str, Any] | None = None):
        self.tasks = {int(k): v for k, v in tasks.items()}
        self.manifest = dict(manifest or {})
        self.root = "<in-memory task data>"

    def task_ids(self) -> list[int]:
        return sorted(self.tasks)

    def task_info(self, t: int) -> dict[str, Any]:
        return {k: v for k, v in self.tasks[t].items() if k != "episodes"}

    def _ep(self, t: int, k: int) -> Mapping[str, Any]:
        return self.tasks[t]["episodes"][f"episode_{k}"]

    def _steps(self, t: int, k: int) -> list[Mapping[str, Any]]:
        steps = self._ep(t, k)["rollout_steps"]
        return [steps[name] for name in sorted(steps, key=lambda s: int(s.split("_", 1)[1]))]

    def episode_indices(self, t: int) -> list[int]:
        return sorted(int(name.split("_", 1)[1]) for name in self.tasks[t]["episodes"])

    def metadata(self, t: int, k: int) -> dict[str, Any]:
        return dict(self._ep(t, k).get("metadata", {}))

    def step_t(self, t: int, k: int) -> list[int]:
        return sorted(int(name.split("_", 1)[1]) for name in self._ep(t, k)["rollout_steps"])

    def fields(self, t: int, k: int) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        out: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
        for step in self._steps(t, k):
            for key, v in step.items():
                if key not in out and isinstance(v, np.ndarray):
                    out[key] = (v.shape, sf.dims_for(key, v.ndim))
        return out

    def present_steps(self, t: int, k: int, key: str) -> list[int]:
        return [i for i, s in enumerate(self._steps(t, k)) if key in s]

    def read(self, t: int, k: int, key: str, layer: int | None = None, steps: Sequence[int] | None = None):
        all_steps = self._steps(t, k)
        idx = range(len(all_steps)) if steps is None else steps
        arr = np.stack([np.asarray(all_steps[i][key]) for i in idx])
        if layer is not None:
            arr = np.take(arr, layer, axis=1 + sf.dims_for(key, arr.ndim - 1).index("layer"))
        return arr


class StoreSource:
    """A :class:`LatentStore` (complete episodes only unless ``include_incomplete``), optionally some tasks only."""

    def __init__(self, store, task_ids: Sequence[int] | None = None, include_incomplete: bool = False):
        self.store = store
        self.manifest = dict(store.manifest)
        self.root = str(store.root)
        self._ids = store.task_ids() if task_ids is None else [int(t) for t in task_ids]
        self._incomplete = include_incomplete

    def task_ids(self) -> list[int]:
        return list(self._ids)

    def task_info(self, t: int) -> dict[str, Any]:
        return dict(self.store.task_info(t))

    def episode_indices(self, t: int) -> list[int]:
        return self.store.episode_indices(t, include_incomplete=self._incomplete)

    def metadata(self, t: int, k: int) -> dict[str, Any]:
        return self.store.episode(t, k).metadata

    def step_t(self, t: int, k: int) -> list[int]:
        return list(self.store.episode(t, k).step_t)

    def fields(self, t: int, k: int) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        return {key: (f.shape, f.dims) for key, f in self.store.episode(t, k).fields.items()}

    def present_steps(self, t: int, k: int, key: str) -> list[int]:
        return self.store.episode(t, k).present_steps(key)

    def read(self, t: int, k: int, key: str, layer: int | None = None, steps: Sequence[int] | None = None):
        return self.store.read_array(t, k, key, layer=layer, steps=None if steps is None else list(steps))


def make_source(data: Any, *, task_ids: Sequence[int] | None = None, allow_pickle: bool = False, manifest=None):
    """A source over a store path, a pickle path, a ``LatentStore``, a (lazy or eager) task dict or ``{id: task}``."""
    from openpi.latents import loading
    from openpi.latents.store_reader import LatentStore, open_store
    from openpi.latents.store_views import TaskData, TasksView

    if isinstance(data, (str, pathlib.Path)):
        if loading.detect_format(pathlib.Path(data)) == "store":
            return StoreSource(open_store(data), task_ids)
        data = loading.load_inference_task_data(data, None, format="pickle", allow_pickle=allow_pickle)
    if isinstance(data, LatentStore):
        return StoreSource(data, task_ids)
    if isinstance(data, TaskData):  # the store behind a lazy task view
        return StoreSource(data.store, [data["task_id"]], data.include_incomplete)
    if isinstance(data, TasksView):
        return StoreSource(data.store, task_ids, data.include_incomplete)
    if isinstance(data, Mapping) and "episodes" in data:
        data = {int(data.get("task_id", 0)): data}
    if isinstance(data, Mapping):
        tasks = {t: v for t, v in data.items() if task_ids is None or int(t) in set(task_ids)}
        return DictSource(tasks, manifest)
    raise TypeError(f"cannot analyse a {type(data).__name__}: pass a store path, task data or a LatentStore")


# --------------------------------------------------------------------------------------------------------------------
# Streams


@dataclasses.dataclass(frozen=True)
class Stream:
    """One analysed stream: where it is stored and how its states are cut out of the stored array."""

    name: str  # text_only | expert_0 | expert_1
    key: str | None  # stored hidden-state key (None: only attention, for expert_1)
    mode: str  # text | text_from_full | pooled | full | none
    n_layers: int
    layers: tuple[int, ...]  # model layer index of each stored layer
    has_cf: bool
    text_start: int = 0
    n_text: int = 0
    n_cams: int = 0
    attention: bool = False  # expert_1: attention_to_text captured
    attention_cf: bool = False

    @property
    def cf_key(self) -> str | None:
        return None if self.key is None else CF + self.key


def model_layers(manifest: Mapping[str, Any], n_stored: int) -> tuple[int, ...]:
    """Model layer index of each stored layer (CaptureSpec.layers; negative indices resolved with the preset)."""
    layers = (manifest.get("capture_spec") or {}).get("layers")
    if layers is None or len(layers) != n_stored:
        return tuple(range(n_stored))
    if any(int(x) < 0 for x in layers):
        try:
            from openpi.policies import policy_config

            depth = policy_config.get_preset(manifest["preset"]).model_config.depth
            return tuple(int(x) % depth for x in layers)
        except (KeyError, ValueError):
            return tuple(int(x) for x in layers)
    return tuple(int(x) for x in layers)


def discover_streams(fields: Mapping[str, tuple], manifest: Mapping[str, Any]) -> tuple[dict[str, Stream], dict]:
    """Streams present in an episode's ``fields`` ({key: (shape, dims)}), and {stream: reason} for those missing."""
    streams: dict[str, Stream] = {}
    missing: dict[str, str] = {}
    spec = manifest.get("capture_spec") or {}
    seg_names = list(manifest.get("segment_names") or [])

    def mk(name, key, mode, **kw):
        shape, dims = fields[key]
        n = shape[dims.index("layer")]
        return Stream(name, key, mode, n, model_layers(manifest, n), CF + key in fields, **kw)

    n_text = fields["text_mask"][0][-1] if "text_mask" in fields else 0
    if "text_only_hidden_states" in fields:
        streams["text_only"] = mk("text_only", "text_only_hidden_states", "text", n_text=n_text)
    elif "expert_0_hidden_states" in fields and n_text:
        tp = fields["expert_0_hidden_states"][0][-2]
        start = int(manifest.get("text_start", tp - n_text))
        streams["text_only"] = mk(
            "text_only", "expert_0_hidden_states", "text_from_full", text_start=start, n_text=n_text
        )
    else:
        missing["text_only"] = (
            f"text window not captured (CaptureSpec.text={spec.get('text')}, expert_0={spec.get('expert_0')!r})"
        )
    if "expert_0_hidden_states" in fields:
        tp = fields["expert_0_hidden_states"][0][-2]
        start = int(manifest.get("text_start", tp - max(n_text, 0)))
        n_cams = sum(1 for s in seg_names if s != "text") or 1
        streams["expert_0"] = mk("expert_0", "expert_0_hidden_states", "full", text_start=start, n_cams=n_cams)
    elif "expert_0_segment_means" in fields:
        n_seg = fields["expert_0_segment_means"][0][-2]
        n_cams = seg_names.index("text") if "text" in seg_names else n_seg - 1
        streams["expert_0"] = mk("expert_0", "expert_0_segment_means", "pooled", n_cams=n_cams)
    else:
        missing["expert_0"] = f"expert 0 not captured (CaptureSpec.expert_0={spec.get('expert_0')!r})"
    att = "attention_to_text" in fields
    att_cf = CF + "attention_to_text" in fields
    for key, mode in (("expert_1_hidden_states", "full"), ("expert_1_segment_means", "pooled")):
        if key in fields:
            streams["expert_1"] = mk("expert_1", key, mode, attention=att, attention_cf=att_cf)
            break
    else:
        if att:
            shape, dims = fields["attention_to_text"]
            n = shape[dims.index("layer")]
            streams["expert_1"] = Stream("expert_1", None, "none", n, model_layers(manifest, n), False, attention=True)
            missing["expert_1_hidden"] = (
                f"expert 1 hidden states not captured (CaptureSpec.expert_1={spec.get('expert_1')!r})"
            )
        else:
            missing["expert_1"] = (
                f"expert 1 not captured (CaptureSpec.expert_1={spec.get('expert_1')!r}, no attention_to_text)"
            )
    return streams, missing


def states(stream: Stream, arr: np.ndarray) -> np.ndarray:
    """The stream's states cut from a stored array (any leading axes; token/segment axis -2, features -1)."""
    if stream.mode == "text_from_full":
        return arr[..., stream.text_start : stream.text_start + stream.n_text, :]
    if stream.name == "expert_0":
        return arr[..., : stream.n_cams, :] if stream.mode == "pooled" else arr[..., : stream.text_start, :]
    return arr


def probe_features(stream: Stream, x: np.ndarray, text_mask: np.ndarray | None = None) -> np.ndarray:
    """One feature vector per (rollout step, batch row) from a layer's states ``x`` [steps, ...] → [steps·B, d].

    text_only: mean over the valid prompt tokens. expert_0: the per-camera means, concatenated (pooled capture:
    over valid tokens; full: over all of a camera's tokens). expert_1: state token and mean of the action tokens,
    concatenated, averaged over the captured denoising steps (axis 1 of ``x`` [steps, S, B, tokens, W]).
    """
    if stream.name == "text_only":
        f = M.masked_mean(x, text_mask)  # [steps, B, W]
    elif stream.name == "expert_0":
        if stream.mode == "full":
            s, b, tp, w = x.shape
            x = x.reshape(s, b, stream.n_cams, tp // stream.n_cams, w).astype(np.float32).mean(-2)
        f = x.astype(np.float32)
    else:
        x = x.astype(np.float32)
        if stream.mode == "full":
            x = np.stack([x[..., 0, :], x[..., 1:, :].mean(-2)], axis=-2)
        f = x.mean(1)  # over denoising steps -> [steps, B, 2, W]
    steps, b = f.shape[:2]
    return f.reshape(steps * b, -1)


# --------------------------------------------------------------------------------------------------------------------
# Notebook accessors (one layer / one step at a time)

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
    prefix = CF if counterfactual else ""
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
