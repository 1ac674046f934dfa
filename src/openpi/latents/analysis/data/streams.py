"""The three streams the analysis reads (names used throughout the report), and how their states are cut out.

* ``text_only``: expert 0 at the valid prompt positions, from ``text_only_hidden_states`` [L, B, T, W] (or, if only
  the full prefix was captured, ``expert_0_hidden_states[..., text_start:text_start+T, :]``).
* ``expert_0``: expert 0 at the image positions: the camera segments of ``expert_0_segment_means`` (pooled) or the
  first ``text_start`` tokens of ``expert_0_hidden_states`` (full; camera c holds tokens
  ``[c·tokens_per_camera, (c+1)·tokens_per_camera)`` with ``tokens_per_camera = text_start / n_cams``). The text part
  of expert 0 is ``text_only``. Only *valid* cameras count: ``segment_mask`` [B, n_cams+1] (stored with every record
  since the capture added it) says which cameras hold valid tokens; a masked camera (pi0 LIBERO masks
  ``right_wrist_0_rgb``) attends to no valid key, so its states are meaningless yet prompt-dependent. Records
  without ``segment_mask`` (stores written before the capture recorded it) count every camera as valid, and the
  analysis notes it (``Stream.segment_note``).
* ``expert_1``: the action expert, ``expert_1_segment_means`` [S, L, B, 2, W] (state token, mean of the action
  tokens) or ``expert_1_hidden_states`` [S, L, B, Ts, W]; plus ``attention_to_text`` [S, L, B, heads, Ts].

Layer labels come from :mod:`openpi.latents.analysis.data.labels`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from openpi.latents import schema
from openpi.latents.analysis import measures as M
from openpi.latents.analysis.data.labels import resolve_layers
from openpi.latents.store.manifest import RunManifest
from openpi.shared import record_keys as rk

STREAMS = ("text_only", "expert_0", "expert_1")


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
    # expert_1: suffix token 0 is pi0's state token (False on pi0.5: every query an action token), and where that
    # was read from
    state_query: bool = True
    state_query_source: str = ""
    layer_kind: str = "model"  # "model": layers are model layer ids; "capture_position": stored order 0..n-1
    layer_note: str | None = None  # how the layer labels were resolved, when not from the manifest's capture_spec
    segment_mask_stored: bool = False  # expert_0: the records hold segment_mask (else every camera counts as valid)
    segment_note: str | None = None  # expert_0: how camera validity / layout was determined, when not stored

    @property
    def cf_key(self) -> str | None:
        return None if self.key is None else schema.counterfactual(self.key)

    @property
    def tokens_per_camera(self) -> int:
        """Image tokens per camera of a full expert-0 capture (``text_start / n_cams``)."""
        return self.text_start // max(self.n_cams, 1)


def _make(name, key, mode, fields, manifest, **kw) -> Stream:
    shape, dims = fields[key]
    n = shape[dims.index("layer")]
    layers, kind, note = resolve_layers(manifest, n, shape[-1])
    has_cf = schema.counterfactual(key) in fields
    return Stream(name, key, mode, n, layers, has_cf, layer_kind=kind, layer_note=note, **kw)


def _text_stream(fields, manifest, spec, streams, missing) -> None:
    n_text = fields[rk.TEXT_MASK][0][-1] if rk.TEXT_MASK in fields else 0
    if rk.TEXT_ONLY_HIDDEN_STATES in fields:
        streams["text_only"] = _make("text_only", rk.TEXT_ONLY_HIDDEN_STATES, "text", fields, manifest, n_text=n_text)
    elif rk.EXPERT_0_HIDDEN_STATES in fields and n_text:
        tp = fields[rk.EXPERT_0_HIDDEN_STATES][0][-2]
        start = int(tp - n_text if manifest.text_start is None else manifest.text_start)
        streams["text_only"] = _make(
            "text_only", rk.EXPERT_0_HIDDEN_STATES, "text_from_full", fields, manifest, text_start=start, n_text=n_text
        )
    else:
        missing["text_only"] = (
            f"text window not captured (CaptureSpec.text={spec.get('text')}, expert_0={spec.get('expert_0')!r})"
        )


def _camera_count(fields, cam_names, notes: list[str]) -> int:
    if cam_names:
        return len(cam_names)
    if rk.SEGMENT_MASK in fields:
        return fields[rk.SEGMENT_MASK][0][-1] - 1
    if rk.EXPERT_0_SEGMENT_MEANS in fields:
        return fields[rk.EXPERT_0_SEGMENT_MEANS][0][-2] - 1
    notes.append("camera layout unknown (no segment_names, no segment_mask): the image tokens form one segment")
    return 1


def _expert0_stream(fields, manifest, spec, streams, missing) -> None:
    seg_stored = rk.SEGMENT_MASK in fields
    notes: list[str] = []
    cam_names = [s for s in (manifest.segment_names or ()) if s != "text"]
    n_cams = _camera_count(fields, cam_names, notes)
    if not seg_stored:
        notes.append(
            "no segment_mask stored (written before the capture recorded it): every camera is treated as valid (a "
            "masked camera's meaningless states would count)"
        )
    if rk.EXPERT_0_HIDDEN_STATES in fields:
        n_text = fields[rk.TEXT_MASK][0][-1] if rk.TEXT_MASK in fields else 0
        tp = fields[rk.EXPERT_0_HIDDEN_STATES][0][-2]
        start = int(tp - max(n_text, 0) if manifest.text_start is None else manifest.text_start)
        if start % n_cams:
            notes.append(f"text_start {start} is not a multiple of {n_cams} cameras: the image tokens form one segment")
            n_cams = 1
        key, mode, kw = rk.EXPERT_0_HIDDEN_STATES, "full", {"text_start": start}
    elif rk.EXPERT_0_SEGMENT_MEANS in fields:
        key, mode, kw = rk.EXPERT_0_SEGMENT_MEANS, "pooled", {}
        n_cams = min(n_cams, fields[rk.EXPERT_0_SEGMENT_MEANS][0][-2] - 1)
    else:
        missing["expert_0"] = f"expert 0 not captured (CaptureSpec.expert_0={spec.get('expert_0')!r})"
        return
    streams["expert_0"] = _make(
        "expert_0",
        key,
        mode,
        fields,
        manifest,
        n_cams=n_cams,
        segment_mask_stored=seg_stored,
        segment_note="; ".join(notes) or None,
        **kw,
    )


def suffix_roles(manifest: RunManifest | Mapping[str, Any]) -> tuple[bool, str]:
    """(whether expert-1 token 0 is pi0's state token, where that was read): the manifest's
    ``suffix_segment_names`` (pi0: ["state", "actions"], pi0.5: ["action_0", "actions_1:"]), else its
    ``model_config`` (``pi05=True``), else pi0 is assumed."""
    manifest = RunManifest.of(manifest)
    names = manifest.suffix_segment_names
    if names:
        return names[0] == "state", f"manifest suffix_segment_names {list(names)}"
    config = manifest.model_config
    if isinstance(config, str) and config:
        return "pi05=True" not in config, "manifest model_config"
    return True, "assumed pi0 (the manifest names no suffix layout): query 0 taken as the state token"


def _expert1_stream(fields, manifest, spec, streams, missing) -> None:
    att = rk.ATTENTION_TO_TEXT in fields
    att_cf = schema.counterfactual(rk.ATTENTION_TO_TEXT) in fields
    state, source = suffix_roles(manifest)
    kw = dict(attention=att, attention_cf=att_cf, state_query=state, state_query_source=source)
    for key, mode in ((rk.EXPERT_1_HIDDEN_STATES, "full"), (rk.EXPERT_1_SEGMENT_MEANS, "pooled")):
        if key in fields:
            streams["expert_1"] = _make("expert_1", key, mode, fields, manifest, **kw)
            return
    if not att:
        missing["expert_1"] = (
            f"expert 1 not captured (CaptureSpec.expert_1={spec.get('expert_1')!r}, no attention_to_text)"
        )
        return
    shape, dims = fields[rk.ATTENTION_TO_TEXT]
    n = shape[dims.index("layer")]
    layers, kind, note = resolve_layers(manifest, n, None)
    streams["expert_1"] = Stream("expert_1", None, "none", n, layers, False, layer_kind=kind, layer_note=note, **kw)
    missing["expert_1_hidden"] = f"expert 1 hidden states not captured (CaptureSpec.expert_1={spec.get('expert_1')!r})"


def discover_streams(
    fields: Mapping[str, tuple], manifest: RunManifest | Mapping[str, Any]
) -> tuple[dict[str, Stream], dict]:
    """Streams present in an episode's ``fields`` ({key: (shape, dims)}), and {stream: reason} for those missing."""
    streams: dict[str, Stream] = {}
    missing: dict[str, str] = {}
    manifest = RunManifest.of(manifest)
    spec = manifest.capture_spec or {}
    for add in (_text_stream, _expert0_stream, _expert1_stream):
        add(fields, manifest, spec, streams, missing)
    return streams, missing


def states(stream: Stream, arr: np.ndarray) -> np.ndarray:
    """The stream's states cut from a stored array (any leading axes; token/segment axis -2, features -1)."""
    if stream.mode == "text_from_full":
        return arr[..., stream.text_start : stream.text_start + stream.n_text, :]
    if stream.name == "expert_0":
        return arr[..., : stream.n_cams, :] if stream.mode == "pooled" else arr[..., : stream.text_start, :]
    return arr


def camera_valid(stream: Stream, segment_mask: np.ndarray | None, batch_shape: tuple[int, ...]) -> np.ndarray | None:
    """expert_0: [*batch_shape, n_cams] bool, which cameras hold valid tokens, from ``segment_mask``
    [*batch_shape, n_cams+1] as stored (the cameras, then the text); None for other streams or without a stored
    ``segment_mask`` (then every camera counts as valid)."""
    if stream.name != "expert_0" or segment_mask is None:
        return None
    cam = np.asarray(segment_mask).astype(bool)[..., : stream.n_cams]
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
