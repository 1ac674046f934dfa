"""The intervention kinds: one class each, with its own `validate` (against a `TokenLayout`, before compiling),
`resolve` (for one pass of the layer stack, inside the jitted program) and the `apply` of what it resolves to.

A kind is a pytree: static structure in meta fields, arrays as data leaves (new values reuse the compiled program).
`resolve(ctx)` gets the pass (`PassContext`: the prefix pass of expert 0, or one denoising step of expert 1) and
returns a `ResolvedEdit` (stream edits: `apply(x, layer)`, the kind's `replacement` gives the new values) or a
`ResolvedKnockout` (`apply(mask, layer, num_kv_heads)`), or None when the operation does nothing in that pass.
A kind may also change the token positions (`position_mask`: which prefix tokens advance the positions).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from openpi.models import stream_points
from openpi.models.intervention_check import Check
from openpi.models.layout import Span, TokenLayout


def pytree_dataclass(*meta: str, data: tuple[str, ...] = ()):
    """A frozen dataclass registered as a pytree: `meta` fields are static structure, `data` fields leaves."""

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))

    return wrap


@dataclasses.dataclass(frozen=True)
class PassContext:
    """One call of the layer stack: `expert` 0 (the prefix pass, once) or 1 (denoising step `step` of `num_steps`,
    may be traced); `token_mask` [B, T]: which of that expert's tokens are valid (padding False)."""

    layout: TokenLayout
    expert: int
    step: jax.Array | None = None
    num_steps: int | None = None
    token_mask: jax.Array | None = None


def layer_slot(layers: tuple[int, ...], layer: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(does `layer` belong to `layers`, its slot in them) for a traced layer index."""
    hit = jnp.asarray(layers) == layer
    return jnp.any(hit), jnp.argmax(hit)


def _step_selection(steps: tuple[int, ...] | None, ctx: PassContext):
    """(active at this step or None for every step, slot of this step in `steps`)."""
    if steps is None:
        return None, jnp.asarray(ctx.step)
    active, slot = layer_slot(tuple(s % ctx.num_steps for s in steps), ctx.step)
    return active, slot


# ---------------------------------------------------------------------------------------------------------------------
# Attention knockouts


@pytree_dataclass("layers", data=("block", "step_active"))
class ResolvedKnockout:
    layers: tuple[int, ...]
    block: np.ndarray  # [heads | 1, queries, keys] bool: True where attention is removed
    step_active: jax.Array | None

    def apply(self, mask: jax.Array, layer: jax.Array, num_kv_heads: int) -> jax.Array:
        active, _ = layer_slot(self.layers, layer)
        if self.step_active is not None:
            active = active & self.step_active
        block = jnp.asarray(self.block)
        block = block.reshape(num_kv_heads, -1, *block.shape[1:]) if block.shape[0] > 1 else block[None]
        return mask & ~(active & block)[None]


class Operation:
    """Defaults shared by every kind."""

    op_name: ClassVar[str]

    def position_mask(self, layout: TokenLayout, prefix_mask: jax.Array) -> jax.Array:
        """Which prefix tokens advance the token positions (default: the valid ones, as the plain model counts)."""
        return prefix_mask

    def notes(self) -> list[str]:
        """What a reader of the run's description should know about this operation."""
        return []


@pytree_dataclass("queries", "keys", "layers", "heads", "denoise_steps")
class Knockout(Operation):
    """Attention from the `queries` tokens onto the `keys` tokens removed (joint spans), masked before the softmax
    exactly as the attention mask does. `denoise_steps` (expert-1 queries only) restricts it to those steps."""

    op_name: ClassVar[str] = "knockout"
    queries: Span
    keys: Span
    layers: tuple[int, ...] | None
    heads: tuple[int, ...] | None
    denoise_steps: tuple[int, ...] | None = None

    def validate(self, check: Check) -> None:
        for name in ("queries", "keys"):
            check.joint_span(name, getattr(self, name))
        check.layers(self.layers)
        check.heads(self.heads)
        if self.denoise_steps is not None:
            if check.layout.joint_span(self.queries)[0] < check.layout.prefix_len:
                check.fail(
                    f"queries={self.queries!r} include prefix tokens, which run once in the prefix pass before "
                    "denoising, so denoise_steps do not apply to them",
                    "knock out expert-1 queries only (queries='suffix', 'actions', ...), or drop denoise_steps",
                )
            check.denoise_steps(self.denoise_steps)

    def resolve(self, ctx: PassContext) -> ResolvedKnockout | None:
        layout = ctx.layout
        tp, ts = layout.prefix_len, layout.suffix_len
        q_pos = np.arange(tp) if ctx.expert == 0 else tp + np.arange(ts)
        k_pos = np.arange(tp) if ctx.expert == 0 else np.arange(tp + ts)
        (qa, qb), (ka, kb) = layout.joint_span(self.queries), layout.joint_span(self.keys)
        block = ((q_pos >= qa) & (q_pos < qb))[:, None] & ((k_pos >= ka) & (k_pos < kb))[None, :]
        if not block.any():
            return None  # none of this pass's queries are knocked out
        if self.heads is None:
            block = block[None]
        else:
            heads = np.zeros(layout.experts[0].num_heads, bool)
            heads[list(self.heads)] = True
            block = heads[:, None, None] & block[None]
        step_active = None if ctx.expert == 0 else _step_selection(self.denoise_steps, ctx)[0]
        return ResolvedKnockout(layout.layer_tuple(self.layers), block, step_active)

    def notes(self) -> list[str]:
        if self.denoise_steps is None:
            return []
        return [
            "a knockout restricted to denoise_steps: attention_key_counts (stored once per inference) are those of "
            "denoising step 0"
        ]


@pytree_dataclass()
class LanguageKnockout(Operation):
    """Language removed entirely: no query of either expert reads the text keys, at every layer and denoising step,
    and the token positions are those of a prompt-free prefix (text tokens do not advance them), so no later token's
    position depends on the prompt's length. The actions are then a function of the images, state and noise alone."""

    op_name: ClassVar[str] = "knockout_language"

    def validate(self, check: Check) -> None:
        pass

    def resolve(self, ctx: PassContext) -> ResolvedKnockout | None:
        return Knockout("all", "text", None, None).resolve(ctx)

    def position_mask(self, layout: TokenLayout, prefix_mask: jax.Array) -> jax.Array:
        return prefix_mask & (jnp.arange(prefix_mask.shape[1]) < layout.text_start)


# ---------------------------------------------------------------------------------------------------------------------
# Stream edits


@pytree_dataclass(
    "kind", "expert", "stream", "start", "stop", "layers", "mode", "neurons",
    data=("payload", "alpha", "step_active", "weights"),
)  # fmt: skip
class ResolvedEdit:
    kind: type  # the operation's class: its `replacement` computes the new values
    expert: int
    stream: str
    start: int
    stop: int
    layers: tuple[int, ...]
    mode: str
    payload: jax.Array | None  # indexed by layer slot
    alpha: jax.Array | None
    step_active: jax.Array | None
    weights: jax.Array | None  # [B, t] valid tokens of the span (own-mean ablation)
    neurons: tuple[int, ...] | None = None  # only these features (last axis) change (neuron ablation)

    def apply(self, x: jax.Array, layer: jax.Array) -> jax.Array:
        active, slot = layer_slot(self.layers, layer)
        if self.step_active is not None:
            active = active & self.step_active
        seg = x[:, self.start : self.stop]
        new = self.kind.replacement(self, seg, slot)
        if self.neurons is not None:
            features = np.zeros(seg.shape[-1], bool)
            features[list(self.neurons)] = True
            new = jnp.where(features, new.astype(seg.dtype), seg)
        return x.at[:, self.start : self.stop].set(jnp.where(active, new.astype(seg.dtype), seg))


@dataclasses.dataclass(frozen=True)
class StreamEdit(Operation):
    """Common fields and checks of the edits of one expert's stream point at a token span. Each kind defines
    `resolved_fields(ctx, start, stop, step_slot) -> dict` (its `ResolvedEdit` fields: mode, payload, alpha,
    weights) and `replacement(e, seg, slot)` (the new values of the span `seg` [B, t, *feature] at layer slot
    `slot`)."""

    expert: int
    tokens: Span
    layers: tuple[int, ...] | None
    stream: stream_points.StreamPoint
    denoise_steps: tuple[int, ...] | None

    def validate(self, check: Check) -> None:
        check.expert_span(self.expert, self.tokens)
        layers = check.layers(self.layers)
        if self.denoise_steps is not None:
            if check.layout.runs_once(self.expert):
                check.fail(
                    f"expert {self.expert} runs once, in the prefix pass before denoising, so denoise_steps do not "
                    "apply (its edit reaches every step through the KV cache)",
                    "drop denoise_steps, or edit expert 1",
                )
            check.denoise_steps(self.denoise_steps)
        start, stop = check.layout.expert_span(self.expert, self.tokens)
        self.validate_values(check, (len(layers), check.batch, stop - start), check.feature(self.expert, self.stream))

    def validate_values(self, check: Check, per_layer: tuple[int, ...], feature: tuple[int, ...]) -> None:
        """Checks the kind's arrays; `per_layer` = (L', B, t)."""

    def resolve(self, ctx: PassContext) -> ResolvedEdit | None:
        if self.expert != ctx.expert:
            return None
        start, stop = ctx.layout.expert_span(self.expert, self.tokens)
        step_active, step_slot = (None, None) if ctx.step is None else _step_selection(self.denoise_steps, ctx)
        fields = self.resolved_fields(ctx, start, stop, step_slot)
        return ResolvedEdit(
            kind=type(self),
            expert=self.expert,
            stream=self.stream,
            start=start,
            stop=stop,
            layers=ctx.layout.layer_tuple(self.layers),
            step_active=step_active,
            **{"mode": "", "payload": None, "alpha": None, "weights": None, **fields},
        )


_EDIT_META = ("expert", "tokens", "layers", "stream", "denoise_steps")


@pytree_dataclass(*_EDIT_META, data=("values",))
class Patch(StreamEdit):
    """The stream at `tokens` replaced by `values` [L', B, t, *feature] (expert 1 may add a leading [S'] axis)."""

    op_name: ClassVar[str] = "patch"
    values: jax.Array

    def validate_values(self, check, per_layer, feature):
        n_steps = check.num_steps if self.denoise_steps is None else len(self.denoise_steps)
        allowed = [(*per_layer, *feature)] + ([(n_steps, *per_layer, *feature)] if self.expert == 1 else [])
        check.shape("values", self.values, allowed, "[L', B, t, *feature] as the capture keys hold them")

    def resolved_fields(self, ctx, start, stop, step_slot):
        payload = self.values
        if payload.ndim == 4 + stream_points.feature_rank(self.stream):  # a leading step axis: this step's values
            payload = payload[step_slot]
        return {"payload": payload}

    @staticmethod
    def replacement(e, seg, slot):
        return e.payload[slot]

    def notes(self) -> list[str]:
        if self.values.dtype != jnp.bfloat16:
            return []
        return [
            "patch values are bfloat16 (the capture's default storage dtype): on a float32 model an own-value patch is "
            "not exact (max action change 3.9e-3 on the fixture model, every layer and token); capture with "
            "CaptureSpec(dtype='float32') to patch exactly"
        ]


@pytree_dataclass(*_EDIT_META, "mode", "neurons", data=("mean",))
class Ablate(StreamEdit):
    """The stream at `tokens` set to zeros (`mode="zero"`), to `mean` ([L', *feature] or [L', B, *feature]), or with
    `mean=None` to the span's own mean over its valid tokens (padding left out), per example and layer."""

    op_name: ClassVar[str] = "ablate"
    mode: Literal["zero", "mean"]
    mean: jax.Array | None
    neurons: tuple[int, ...] | None = None  # only these features (last axis), e.g. FFN neurons; None: all

    def validate_values(self, check, per_layer, feature):
        if self.neurons is not None:
            check.indices(self.neurons, feature[-1], "neurons", f"the stream has {feature[-1]} features")
        if self.mean is not None:
            n_layers, batch, _ = per_layer
            allowed = [(n_layers, *feature), (n_layers, batch, *feature)]
            check.shape("mean", self.mean, allowed, "[L', *feature] or [L', B, *feature]")

    def resolved_fields(self, ctx, start, stop, step_slot):
        return {"neurons": self.neurons} | self._mode_fields(ctx, start, stop)

    def _mode_fields(self, ctx, start, stop):
        if self.mode == "zero":
            return {"mode": "zero"}
        if self.mean is None:
            weights = None if ctx.token_mask is None else ctx.token_mask[:, start:stop]
            return {"mode": "own_mean", "weights": weights}
        rank = stream_points.feature_rank(self.stream)
        mean = self.mean if self.mean.ndim == 2 + rank else self.mean[:, None]  # -> [L', B | 1, *f]
        return {"mode": "mean", "payload": mean}

    @staticmethod
    def replacement(e, seg, slot):
        if e.mode == "zero":
            return jnp.zeros_like(seg)
        if e.mode == "mean":
            return jnp.broadcast_to(e.payload[slot][:, None], seg.shape)
        x = seg.astype(jnp.float32)
        if e.weights is None:
            mean = jnp.mean(x, axis=1, keepdims=True)
        else:  # valid tokens only; a span without any is set to 0 (the mean of nothing, as pooled captures take it)
            w = e.weights.astype(jnp.float32).reshape(*e.weights.shape, *(1,) * (seg.ndim - 2))
            mean = jnp.sum(x * w, axis=1, keepdims=True) / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
        return jnp.broadcast_to(mean, seg.shape)


@pytree_dataclass(*_EDIT_META, data=("vector", "alpha"))
class Steer(StreamEdit):
    """`alpha * vector` ([*feature], or [L', *feature] per layer) added to the stream at `tokens`."""

    op_name: ClassVar[str] = "steer"
    vector: jax.Array
    alpha: jax.Array

    def validate_values(self, check, per_layer, feature):
        check.shape("vector", self.vector, [feature, (per_layer[0], *feature)], "[*feature] or [L', *feature]")
        check.shape("alpha", self.alpha, [()], "a scalar")

    def resolved_fields(self, ctx, start, stop, step_slot):
        rank = stream_points.feature_rank(self.stream)
        n_layers = len(ctx.layout.layer_tuple(self.layers))
        payload = jnp.broadcast_to(self.vector, (n_layers, *self.vector.shape[self.vector.ndim - rank :]))
        return {"payload": payload, "alpha": self.alpha}

    @staticmethod
    def replacement(e, seg, slot):
        return seg + (e.alpha * e.payload[slot]).astype(seg.dtype)


KINDS: tuple[type[Operation], ...] = (Knockout, LanguageKnockout, Patch, Ablate, Steer)
