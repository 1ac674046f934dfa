"""An `Intervention` resolved for one call of the Gemma layer stack, and the hooks the layer body calls.

`for_prefix` / `for_denoise_step` turn an `intervention.Intervention` into the `LayerEdits` of one pass (inside the
jitted program: token spans become static slices, layers and denoising steps become masks on the scanned layer index
and the step index). The layer body calls three hooks, each the identity when `edits` is None:
`edit_streams` (residual entering a layer), `edit_stream` (attention / per-head output) and `knock_out` (the mask).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from openpi.models.intervention import (
    Ablate,
    Intervention,
    Knockout,
    Patch,
    StreamEdit,
    expert_span,
    joint_span,
    layer_tuple,
    pytree_dataclass,
)

if TYPE_CHECKING:
    from openpi.models.pi0_config import Pi0Config


def for_prefix(iv: Intervention, config: Pi0Config) -> LayerEdits:
    """The edits of the prefix pass: expert-0 edits and knockouts of prefix queries."""
    return _resolve(iv, config, expert=0, step=None, num_steps=None)


def for_denoise_step(iv: Intervention, config: Pi0Config, step: jax.Array, num_steps: int) -> LayerEdits:
    """The edits of denoising step `step` (may be traced): expert-1 edits and knockouts of suffix queries."""
    return _resolve(iv, config, expert=1, step=step, num_steps=num_steps)


@pytree_dataclass(
    "expert", "stream", "start", "stop", "layers", "kind", "neurons", data=("payload", "alpha", "step_active")
)
class _Edit:
    expert: int
    stream: str
    start: int
    stop: int
    layers: tuple[int, ...]
    kind: str  # "patch" | "zero" | "own_mean" | "mean" | "steer"
    payload: jax.Array | None  # indexed by layer slot
    alpha: jax.Array | None
    step_active: jax.Array | None
    neurons: tuple[int, ...] | None = None  # an ablation of these features (last axis) only


@pytree_dataclass("layers", data=("block",))
class _Knock:
    layers: tuple[int, ...]
    block: np.ndarray  # [heads | 1, queries, keys] bool: True where attention is removed


@pytree_dataclass(data=("edits", "knockouts"))
class LayerEdits:
    """What one call of the layer stack changes; passed to `gemma.Module(..., edits=)`."""

    edits: tuple[_Edit, ...]
    knockouts: tuple[_Knock, ...]


def _slot(layers: tuple[int, ...], layer: jax.Array) -> tuple[jax.Array, jax.Array]:
    hit = jnp.asarray(layers) == layer
    return jnp.any(hit), jnp.argmax(hit)


def _resolve(iv: Intervention, config: Pi0Config, *, expert: int, step, num_steps) -> LayerEdits:
    depth = config.depth
    edits, knocks = [], []
    for op in iv.ops:
        if isinstance(op, Knockout):
            knock = _knock_block(op, config, expert)
            if knock is not None:
                knocks.append(_Knock(layer_tuple(op.layers, depth), knock))
        elif op.expert == expert:
            edits.append(_resolve_edit(op, config, step=step, num_steps=num_steps))
    return LayerEdits(tuple(edits), tuple(knocks))


def _knock_block(op: Knockout, config: Pi0Config, expert: int) -> np.ndarray | None:
    tp, ts = config.prefix_len, config.suffix_len
    q_pos = np.arange(tp) if expert == 0 else tp + np.arange(ts)
    k_pos = np.arange(tp) if expert == 0 else np.arange(tp + ts)
    (qa, qb), (ka, kb) = joint_span(config, op.queries), joint_span(config, op.keys)
    block = ((q_pos >= qa) & (q_pos < qb))[:, None] & ((k_pos >= ka) & (k_pos < kb))[None, :]
    if not block.any():
        return None  # none of this pass's queries are knocked out
    if op.heads is None:
        return block[None]
    heads = np.zeros(config.paligemma_config.num_heads, bool)
    heads[list(op.heads)] = True
    return heads[:, None, None] & block[None]


def _resolve_edit(op: StreamEdit, config: Pi0Config, *, step, num_steps) -> _Edit:
    start, stop = expert_span(config, op.expert, op.tokens)
    layers = layer_tuple(op.layers, config.depth)
    rank = _feature_rank(op.stream)
    step_active, step_slot, payload, alpha = None, None, None, None
    if op.expert == 1:
        steps = tuple(range(num_steps)) if op.denoise_steps is None else tuple(s % num_steps for s in op.denoise_steps)
        active, step_slot = _slot(steps, step)
        step_active = None if op.denoise_steps is None else active
    if isinstance(op, Patch):
        kind, payload = "patch", op.values
        if payload.ndim == 4 + rank:  # expert 1 with a leading denoising-step axis: this step's values
            payload = payload[step_slot]
    elif isinstance(op, Ablate):
        kind = "zero" if op.mode == "zero" else ("own_mean" if op.mean is None else "mean")
        if kind == "mean":  # [L', *f] or [L', B, *f] -> [L', B | 1, *f]
            payload = op.mean if op.mean.ndim == 2 + rank else op.mean[:, None]
    else:
        kind, alpha = "steer", op.alpha
        payload = jnp.broadcast_to(op.vector, (len(layers), *op.vector.shape[op.vector.ndim - rank :]))
    neurons = getattr(op, "neurons", None)
    return _Edit(op.expert, op.stream, start, stop, layers, kind, payload, alpha, step_active, neurons)


def _feature_rank(stream: str) -> int:
    return 2 if stream == "head_out" else 1


def _apply_edit(e: _Edit, x: jax.Array, layer: jax.Array) -> jax.Array:
    active, slot = _slot(e.layers, layer)
    if e.step_active is not None:
        active = active & e.step_active
    seg = x[:, e.start : e.stop]
    if e.kind == "patch":
        new = e.payload[slot]
    elif e.kind == "zero":
        new = jnp.zeros_like(seg)
    elif e.kind == "own_mean":
        new = jnp.broadcast_to(jnp.mean(seg, axis=1, keepdims=True), seg.shape)
    elif e.kind == "mean":
        new = jnp.broadcast_to(e.payload[slot][:, None], seg.shape)
    else:
        new = seg + (e.alpha * e.payload[slot]).astype(seg.dtype)
    if e.neurons is not None:  # ablate the listed features only
        features = np.zeros(seg.shape[-1], bool)
        features[list(e.neurons)] = True
        new = jnp.where(features, new.astype(seg.dtype), seg)
    return x.at[:, e.start : e.stop].set(jnp.where(active, new.astype(seg.dtype), seg))


def edit_stream(edits: LayerEdits | None, stream: str, expert: int, x: jax.Array | None, layer: jax.Array):
    """Hook: expert `expert`'s `stream` at `layer` after this call's edits (x itself when nothing applies)."""
    if edits is None or x is None:
        return x
    if not isinstance(edits, LayerEdits):  # another edit with the same hooks (`patching.SiteMix`)
        return edits.edit_stream(stream, expert, x, layer)
    for e in edits.edits:
        if e.stream == stream and e.expert == expert:
            x = _apply_edit(e, x, layer)
    return x


def edit_streams(edits: LayerEdits | None, stream: str, xs: list, layer: jax.Array) -> list:
    """Hook: `edit_stream` for every expert's stream."""
    return [edit_stream(edits, stream, i, x, layer) for i, x in enumerate(xs)]


def knock_out(edits: LayerEdits | None, mask: jax.Array, layer: jax.Array, num_kv_heads: int) -> jax.Array:
    """Hook: the attention mask [B, 1, 1, T, S] (True = attend) with this layer's knockouts removed; the result has
    per-head axes [B, K, G, T, S] (K kv heads x G queries per kv head) when a knockout selects heads."""
    if edits is None:
        return mask
    if not isinstance(edits, LayerEdits):
        return edits.knock_out(mask, layer, num_kv_heads)
    for k in edits.knockouts:
        active, _ = _slot(k.layers, layer)
        block = jnp.asarray(k.block)
        block = block.reshape(num_kv_heads, -1, *block.shape[1:]) if block.shape[0] > 1 else block[None]
        mask = mask & ~(active & block)[None]
    return mask
