"""What the analysis reads: a uniform source over a store or seed-style dicts, and the three streams it analyses.

A *source* answers one-layer questions: ``read(task, episode, key, layer=l, steps=[...])`` returns that key's layer
``l`` across the given rollout steps as one array ``[steps, ...]`` (the layer axis removed). Over the zarr store this
reads only that layer's chunks (:meth:`LatentStore.read_array`); over pickled / in-memory seed dicts (already in RAM)
it stacks the steps.

Layer and denoising-step ids: stored layer / step j is labelled with the model layer / denoising step it holds,
resolved from the manifest's ``capture_spec`` (:func:`resolve_layers`, :func:`resolve_denoise_steps`). Pickles carry
the run manifest under ``data["manifest"]``; without one (older pickles, plain dicts) the layers are labelled by capture
position 0..n-1 unless the stored count equals the depth of the preset whose width matches the data, and the analysis
says which (``Stream.layer_note``).

Streams (names used throughout the report):

* ``text_only``: expert 0 at the valid prompt positions, from ``text_only_hidden_states`` [L, B, T, W] (or, if only
  the full prefix was captured, ``expert_0_hidden_states[..., text_start:text_start+T, :]``).
* ``expert_0``: expert 0 at the image positions: the camera segments of ``expert_0_segment_means`` (pooled) or the
  first ``text_start`` tokens of ``expert_0_hidden_states`` (full; camera c holds tokens
  ``[c·tokens_per_camera, (c+1)·tokens_per_camera)`` with ``tokens_per_camera = text_start / n_cams``). The text part
  of expert 0 is ``text_only``. Only *valid* cameras count: ``segment_mask`` [B, n_cams+1] (stored with every record
  since the capture added it) says which cameras hold valid tokens; a masked camera (pi0 LIBERO masks
  ``right_wrist_0_rgb``) attends to no valid key, so its states are meaningless yet prompt-dependent. Stores written
  before ``segment_mask`` existed fall back to the masks the manifest's preset feeds the model
  (:func:`preset_segment_mask`: pi0 LIBERO = base, left wrist valid, right wrist masked; every camera valid when the
  preset is unknown, which the analysis notes).
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
from openpi.latents import schema

STREAMS = ("text_only", "expert_0", "expert_1")


class DictSource:
    """Seed-style nested dicts (``{task_id: task_data}``; pickles or :func:`materialize` output), already in RAM."""

    def __init__(self, tasks: Mapping[int, Mapping[str, Any]], manifest: Mapping[str, Any] | None = None):
        """``manifest``: the run manifest; default: the ``"manifest"`` a task dict carries (pickles written since
        the pickle format stored it), else none (then layer ids and camera layout are inferred and flagged)."""
        self.tasks = {int(k): v for k, v in tasks.items()}
        if manifest is None:
            manifest = next((v["manifest"] for v in self.tasks.values() if v.get("manifest")), None)
        self.manifest = dict(manifest or {})
        self.root = "<in-memory task data>"

    def task_ids(self) -> list[int]:
        return sorted(self.tasks)

    def task_info(self, t: int) -> dict[str, Any]:
        return {k: v for k, v in self.tasks[t].items() if k not in ("episodes", "manifest")}

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
                    out[key] = (v.shape, schema.dims_for(key, v.ndim))
        return out

    def present_steps(self, t: int, k: int, key: str) -> list[int]:
        return [i for i, s in enumerate(self._steps(t, k)) if key in s]

    def read(self, t: int, k: int, key: str, layer: int | None = None, steps: Sequence[int] | None = None):
        all_steps = self._steps(t, k)
        idx = range(len(all_steps)) if steps is None else steps
        arr = np.stack([np.asarray(all_steps[i][key]) for i in idx])
        if layer is not None:
            arr = np.take(arr, layer, axis=1 + schema.dims_for(key, arr.ndim - 1).index("layer"))
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


def make_source(
    data: Any, *, task_ids: Sequence[int] | None = None, allow_pickle: bool = False, manifest=None, skip_damaged=False
):
    """A source over a store path, a pickle path, a ``LatentStore``, a (lazy or eager) task dict or ``{id: task}``.
    A store path with damaged episodes is refused (StoreCorruptionError listing them) unless ``skip_damaged``."""
    from openpi.latents.store import loading
    from openpi.latents.store.reader import LatentStore, open_store
    from openpi.latents.store.views import TaskData, TasksView

    if isinstance(data, (str, pathlib.Path)):
        if loading.detect_format(pathlib.Path(data)) == "store":
            opened = open_store(data)
            opened.require_intact(skip_damaged=skip_damaged)
            return StoreSource(opened, task_ids)
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
    layers: tuple[int, ...]  # label of each stored layer: model layer id, or capture position (see layer_kind)
    has_cf: bool
    text_start: int = 0
    n_text: int = 0
    n_cams: int = 0
    attention: bool = False  # expert_1: attention_to_text captured
    attention_cf: bool = False
    layer_kind: str = "model"  # "model": layers are model layer ids; "capture_position": stored order 0..n-1
    layer_note: str | None = None  # how the layer labels were resolved, when not from the manifest's capture_spec
    segment_mask_stored: bool = False  # expert_0: the records hold segment_mask
    fallback_segment_mask: tuple[bool, ...] | None = None  # expert_0 camera validity when not stored (None: all)
    segment_note: str | None = None  # expert_0: how camera validity / layout was determined, when not stored

    @property
    def cf_key(self) -> str | None:
        return None if self.key is None else schema.counterfactual(self.key)

    @property
    def tokens_per_camera(self) -> int:
        """Image tokens per camera of a full expert-0 capture (``text_start / n_cams``)."""
        return self.text_start // max(self.n_cams, 1)


def _preset(manifest: Mapping[str, Any]):
    try:
        from openpi.policies import policy_config

        return policy_config.get_preset(manifest.get("preset"))
    except (KeyError, ValueError, TypeError):
        return None


def _preset_for_width(width: int | None, expert: int):
    """The presets whose expert ``expert`` has this width (the only hint about depth when there is no manifest)."""
    if width is None:
        return []
    from openpi.policies import policy_config

    out = []
    for name in policy_config.list_presets():
        cfg = policy_config.get_preset(name).model_config
        w = (cfg.paligemma_config if expert == 0 else cfg.action_expert_config).width
        if w == width:
            out.append((name, cfg.depth))
    return out


def resolve_layers(
    manifest: Mapping[str, Any], n_stored: int, width: int | None = None, expert: int = 0
) -> tuple[tuple[int, ...], str, str | None]:
    """(label of each stored layer, "model" | "capture_position", note or None).

    With the manifest's ``capture_spec``: ``layers`` (None = all; negatives resolved with the preset's depth) are the
    model layer ids. Without one (no manifest: older pickles, plain dicts), the stored layers are model layers
    0..n-1 only if ``n_stored`` equals the depth of the manifest's preset, or of every preset whose expert-``expert``
    width equals ``width`` (what the data implies); otherwise they are labelled by capture position 0..n-1. Every
    case that is not read off a capture_spec comes with a note saying so.
    """
    positions = tuple(range(n_stored))
    spec = manifest.get("capture_spec")
    preset = _preset(manifest)
    depth = None if preset is None else preset.model_config.depth
    if isinstance(spec, Mapping):
        layers = spec.get("layers")
        if layers is None:
            if depth is None or depth == n_stored:
                return positions, "model", None
            return (
                positions,
                "capture_position",
                (
                    f"capture_spec.layers is None (all layers) but {n_stored} layers are stored and preset "
                    f"{preset.name} has {depth}: layers labelled by capture position, not model layer ids"
                ),
            )
        if len(layers) != n_stored:
            return (
                positions,
                "capture_position",
                (
                    f"capture_spec.layers lists {len(layers)} layers but {n_stored} are stored: layers labelled by "
                    "capture position, not model layer ids"
                ),
            )
        if any(int(x) < 0 for x in layers):
            if depth is None:
                return (
                    positions,
                    "capture_position",
                    (
                        f"capture_spec.layers {list(layers)} has negative ids and the preset's depth is unknown: "
                        "layers labelled by capture position, not model layer ids"
                    ),
                )
            return tuple(int(x) % depth for x in layers), "model", None
        return tuple(int(x) for x in layers), "model", None
    what = "the manifest has no capture_spec" if manifest else "no run manifest (e.g. a pickle written before "
    what += "" if manifest else "pickles stored it, or in-memory task data)"
    if preset is not None:
        candidates = [(preset.name, depth)]
    else:
        candidates = _preset_for_width(width, expert)
    depths = {d for _, d in candidates}
    if depths == {n_stored}:
        names = ", ".join(n for n, _ in candidates)
        return (
            positions,
            "model",
            (
                f"{what}: the {n_stored} stored layers are taken as all layers of the model (their count equals the "
                f"depth of {names}{'' if preset is not None else f', whose width {width} matches the data'})"
            ),
        )
    implied = (
        "no known preset matches the data"
        if not candidates
        else "; ".join(f"{n} has {d} layers" for n, d in candidates)
    )
    return (
        positions,
        "capture_position",
        (
            f"{what}: the {n_stored} stored layers are labelled by capture position 0..{n_stored - 1}, not model layer "
            f"ids ({implied})"
        ),
    )


def resolve_denoise_steps(manifest: Mapping[str, Any], n_stored: int) -> tuple[tuple[int, ...], str, str | None]:
    """(denoising-step id of each captured step, "model" | "capture_position", note or None).

    Ids come from the manifest's ``capture_spec`` (``CaptureSpec.step_indices(num_steps)``, num_steps = the
    manifest's ``arguments.num_denoise_steps``, default 10); step 0 is t = 1.0 (pure noise). Without a usable
    capture_spec the steps are labelled by capture position, with a note.
    """
    from openpi.models.capture import CaptureSpec

    positions = tuple(range(n_stored))
    spec = manifest.get("capture_spec")
    if not isinstance(spec, Mapping):
        return (
            positions,
            "capture_position",
            ("no capture_spec in the manifest: denoising steps labelled by capture position, not step ids"),
        )
    num_steps = int((manifest.get("arguments") or {}).get("num_denoise_steps", 10))
    try:
        ids = CaptureSpec.from_dict(dict(spec)).step_indices(num_steps)
    except (ValueError, TypeError) as e:
        return positions, "capture_position", f"capture_spec unusable ({e}): denoising steps labelled by position"
    if len(ids) != n_stored:
        return (
            positions,
            "capture_position",
            (
                f"capture_spec gives {len(ids)} denoising steps of {num_steps} but {n_stored} are stored: labelled by "
                "capture position"
            ),
        )
    return tuple(int(i) for i in ids), "model", None


def preset_segment_mask(
    manifest: Mapping[str, Any], camera_names: Sequence[str]
) -> tuple[tuple[bool, ...] | None, str]:
    """Camera validity for records without ``segment_mask``: the image masks the manifest's preset feeds the model.

    pi0 LIBERO (``LiberoInputs``): base and left wrist valid, ``right_wrist_0_rgb`` masked (valid only for
    pi0-FAST). Returns (None, note) when the preset or the camera names are unknown: then every camera counts as valid.
    """
    preset = _preset(manifest)
    if preset is None or not camera_names:
        return None, (
            "no segment_mask stored and no known preset/camera names in the manifest: every camera is treated as "
            "valid (a masked camera's meaningless states would count)"
        )
    from openpi.policies import libero_policy

    img = np.zeros((1, 1, 3), np.uint8)
    masks = libero_policy.LiberoInputs(preset.model_type)(
        {"observation/image": img, "observation/wrist_image": img, "observation/state": np.zeros(8)}
    )["image_mask"]
    if any(n not in masks for n in camera_names):
        return None, f"no segment_mask stored and cameras {list(camera_names)} unknown to the preset: all valid"
    valid = tuple(bool(masks[n]) for n in camera_names)
    shown = ", ".join(f"{n}={'valid' if v else 'masked'}" for n, v in zip(camera_names, valid))
    return (
        valid,
        f"no segment_mask stored (written before the capture recorded it): preset {preset.name}'s masks ({shown})",
    )


def discover_streams(fields: Mapping[str, tuple], manifest: Mapping[str, Any]) -> tuple[dict[str, Stream], dict]:
    """Streams present in an episode's ``fields`` ({key: (shape, dims)}), and {stream: reason} for those missing."""
    streams: dict[str, Stream] = {}
    missing: dict[str, str] = {}
    spec = manifest.get("capture_spec") or {}
    seg_names = list(manifest.get("segment_names") or [])
    cam_names = [s for s in seg_names if s != "text"]

    def mk(name, key, mode, expert=0, **kw):
        shape, dims = fields[key]
        n = shape[dims.index("layer")]
        layers, kind, note = resolve_layers(manifest, n, shape[-1], expert)
        return Stream(
            name, key, mode, n, layers, schema.counterfactual(key) in fields, layer_kind=kind, layer_note=note, **kw
        )

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
    seg_stored = "segment_mask" in fields
    notes = []
    if cam_names:
        n_cams = len(cam_names)
    elif seg_stored:
        n_cams = fields["segment_mask"][0][-1] - 1
    elif "expert_0_segment_means" in fields:
        n_cams = fields["expert_0_segment_means"][0][-2] - 1
    else:
        n_cams = 1
        notes.append("camera layout unknown (no segment_names, no segment_mask): the image tokens form one segment")
    fallback = None
    if not seg_stored:
        fallback, why = preset_segment_mask(manifest, cam_names)
        notes.append(why)
    if "expert_0_hidden_states" in fields:
        tp = fields["expert_0_hidden_states"][0][-2]
        start = int(manifest.get("text_start", tp - max(n_text, 0)))
        if start % n_cams:
            notes.append(f"text_start {start} is not a multiple of {n_cams} cameras: the image tokens form one segment")
            n_cams, fallback = 1, None
        mode, kw = "full", {"text_start": start}
        key = "expert_0_hidden_states"
    elif "expert_0_segment_means" in fields:
        n_seg = fields["expert_0_segment_means"][0][-2]
        mode, kw, key = "pooled", {}, "expert_0_segment_means"
        n_cams = min(n_cams, n_seg - 1)
    else:
        key = None
        missing["expert_0"] = f"expert 0 not captured (CaptureSpec.expert_0={spec.get('expert_0')!r})"
    if key is not None:
        if fallback is not None and len(fallback) != n_cams:
            notes.append(f"the preset's {len(fallback)} camera masks do not fit {n_cams} cameras: all treated as valid")
            fallback = None
        streams["expert_0"] = mk(
            "expert_0",
            key,
            mode,
            n_cams=n_cams,
            segment_mask_stored=seg_stored,
            fallback_segment_mask=fallback,
            segment_note="; ".join(notes) or None,
            **kw,
        )
    att = "attention_to_text" in fields
    att_cf = schema.counterfactual("attention_to_text") in fields
    for key, mode in (("expert_1_hidden_states", "full"), ("expert_1_segment_means", "pooled")):
        if key in fields:
            streams["expert_1"] = mk("expert_1", key, mode, expert=1, attention=att, attention_cf=att_cf)
            break
    else:
        if att:
            shape, dims = fields["attention_to_text"]
            n = shape[dims.index("layer")]
            layers, kind, note = resolve_layers(manifest, n, None, 1)
            streams["expert_1"] = Stream(
                "expert_1", None, "none", n, layers, False, attention=True, layer_kind=kind, layer_note=note
            )
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


def camera_valid(stream: Stream, segment_mask: np.ndarray | None, batch_shape: tuple[int, ...]) -> np.ndarray | None:
    """expert_0: [*batch_shape, n_cams] bool, which cameras hold valid tokens; None for other streams or when every
    camera counts as valid (no segment_mask and no preset fallback).

    ``segment_mask`` [*batch_shape, n_cams+1] as stored (the cameras, then the text), or None: then the stream's
    preset fallback (:func:`preset_segment_mask`), broadcast to ``batch_shape`` (e.g. (steps, B)).
    """
    if stream.name != "expert_0":
        return None
    if segment_mask is not None:
        cam = np.asarray(segment_mask).astype(bool)[..., : stream.n_cams]
    elif stream.fallback_segment_mask is not None:
        cam = np.asarray(stream.fallback_segment_mask, bool)
    else:
        return None
    return np.broadcast_to(cam, (*batch_shape, stream.n_cams))


def position_mask(stream: Stream, cam_valid: np.ndarray | None) -> np.ndarray | None:
    """Valid positions of the expert-0 states (the token/segment axis) from :func:`camera_valid`: pooled, one
    position per camera; full, each camera's flag repeated over its ``tokens_per_camera`` tokens."""
    if cam_valid is None:
        return None
    return np.repeat(cam_valid, stream.tokens_per_camera, axis=-1) if stream.mode == "full" else cam_valid


def probe_features(
    stream: Stream, x: np.ndarray, text_mask: np.ndarray | None = None, cam_valid: np.ndarray | None = None
) -> np.ndarray:
    """One feature vector per (rollout step, batch row) from a layer's states ``x`` [steps, ...] → [steps·B, d].

    text_only: mean over the valid prompt tokens. expert_0: the per-camera means, concatenated (pooled capture:
    over valid tokens; full: over all of a camera's tokens), an invalid camera's block set to 0 (``cam_valid``
    [steps, B, n_cams]; :func:`drop_invalid_cameras` then removes cameras invalid in every row). expert_1: state token
    and mean of the action tokens, concatenated, averaged over the captured denoising steps (axis 1 of ``x``
    [steps, S, B, tokens, W]).
    """
    if stream.name == "text_only":
        f = M.masked_mean(x, text_mask)  # [steps, B, W]
    elif stream.name == "expert_0":
        if stream.mode == "full":
            s, b, tp, w = x.shape
            x = x.reshape(s, b, stream.n_cams, tp // stream.n_cams, w).astype(np.float32).mean(-2)
        f = x.astype(np.float32)
        if cam_valid is not None:
            f = np.where(cam_valid[..., None], f, np.float32(0))
    else:
        x = x.astype(np.float32)
        if stream.mode == "full":
            x = np.stack([x[..., 0, :], x[..., 1:, :].mean(-2)], axis=-2)
        f = x.mean(1)  # over denoising steps -> [steps, B, 2, W]
    steps, b = f.shape[:2]
    return f.reshape(steps * b, -1)


def drop_invalid_cameras(stream: Stream, feats: np.ndarray, cam_rows: np.ndarray | None) -> np.ndarray:
    """expert_0 probe features [N, n_cams·W] without the cameras that are valid in no row (``cam_rows`` [N, n_cams])."""
    if stream.name != "expert_0" or cam_rows is None:
        return feats
    keep = cam_rows.any(axis=0)
    n = len(feats)
    return feats.reshape(n, stream.n_cams, -1)[:, keep].reshape(n, -1)


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
