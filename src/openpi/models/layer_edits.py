"""An `Intervention` resolved for one call of the Gemma layer stack, and the hooks the layer body calls.

`for_prefix` / `for_denoise_step` resolve each operation of an `intervention.Intervention` for one pass (inside the
jitted program: token spans become static slices, layers and denoising steps become masks on the scanned layer index
and the step index); each kind's `resolve` / `apply` is its own (`intervention_kinds`). The layer body calls three
hooks, each the identity when `edits` is None: `edit_streams` (a stream point of every expert), `edit_stream` (one
expert's) and `knock_out` (the attention mask). `position_mask` gives the tokens that advance the positions.
"""

from __future__ import annotations

import jax

from openpi.models.intervention import Intervention
from openpi.models.intervention_kinds import PassContext, ResolvedEdit, ResolvedKnockout, pytree_dataclass
from openpi.models.layout import TokenLayout, layout_of


@pytree_dataclass(data=("edits", "knockouts"))
class LayerEdits:
    """What one call of the layer stack changes; passed to `gemma.Module(..., edits=)`."""

    edits: tuple[ResolvedEdit, ...]
    knockouts: tuple[ResolvedKnockout, ...]


def for_prefix(iv: Intervention, model_or_config, token_mask: jax.Array | None = None) -> LayerEdits:
    """The edits of the prefix pass: expert-0 edits and knockouts of prefix queries. `token_mask` [B, Tp]: the valid
    prefix tokens (own-mean ablations average those only)."""
    return _resolve(iv, PassContext(layout_of(model_or_config), expert=0, token_mask=token_mask))


def for_denoise_step(
    iv: Intervention, model_or_config, step: jax.Array, num_steps: int, token_mask: jax.Array | None = None
) -> LayerEdits:
    """The edits of denoising step `step` (may be traced): expert-1 edits and knockouts of suffix queries."""
    ctx = PassContext(layout_of(model_or_config), expert=1, step=step, num_steps=num_steps, token_mask=token_mask)
    return _resolve(iv, ctx)


def _resolve(iv: Intervention, ctx: PassContext) -> LayerEdits:
    resolved = [r for r in (op.resolve(ctx) for op in iv.ops) if r is not None]
    edits = tuple(r for r in resolved if isinstance(r, ResolvedEdit))
    return LayerEdits(edits, tuple(r for r in resolved if isinstance(r, ResolvedKnockout)))


def position_mask(iv: Intervention | None, layout: TokenLayout, prefix_mask: jax.Array) -> jax.Array:
    """The prefix tokens that advance the token positions (the valid ones unless an operation says otherwise)."""
    for op in () if iv is None else iv.ops:
        prefix_mask = op.position_mask(layout, prefix_mask)
    return prefix_mask


def edit_stream(edits: LayerEdits | None, stream: str, expert: int, x: jax.Array | None, layer: jax.Array):
    """Hook: expert `expert`'s `stream` at `layer` after this call's edits (x itself when nothing applies)."""
    if edits is None or x is None:
        return x
    if not isinstance(edits, LayerEdits):  # another edit with the same hooks (`patching.SiteMix`)
        return edits.edit_stream(stream, expert, x, layer)
    for e in edits.edits:
        if e.stream == stream and e.expert == expert:
            x = e.apply(x, layer)
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
        mask = k.apply(mask, layer, num_kv_heads)
    return mask
