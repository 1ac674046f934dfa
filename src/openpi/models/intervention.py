"""Interventions on a model's streams, compiled into the jitted program beside the capture taps.

An `Intervention` is a pytree: its structure (which expert, stream point, layers, token span, denoising steps and
operation) is static, its arrays (patch values, means, steering vectors, alpha) are leaves. New values therefore reuse
the compiled program; a new structure compiles once. Build one from the named operations and combine with `+`:

    iv = knockout_attention("all", "text") + steer(1, "actions", layers=(3,), vector=v, alpha=2.0)

Each kind is one class in `intervention_kinds` (`Knockout`, `LanguageKnockout`, `Patch`, `Ablate`, `Steer`) with its
own validate / resolve / apply. Stream points (`stream=`) are the vocabulary of `stream_points` that capture taps use
too; editable: residual (entering layer l), head_out (per head, before the output projection), attn_out (after it,
before the residual add), post_attn_residual (after the attention block's residual add), mlp_out (the FFN output,
before the residual add), ffn_hidden (the FFN neurons: the gated product before the down projection; `ablate(...,
neurons=)` / `openpi.models.neurons` act on single neurons).

Token spans (`layout.TokenLayout`): a named segment — each camera and "text" (expert 0), "state" and "actions"
(expert 1), "all" (every token of the expert) — or `(start, stop)` over the expert's own tokens (expert 0: the prefix,
expert 1: the suffix). Attention knockouts address the joint sequence [prefix | suffix]: the same names plus "prefix",
"suffix" and "all", or `(start, stop)` in joint positions.

Expert 0 and the denoising steps: expert 0 runs once, in the prefix pass, which fills the KV cache; expert 1 runs in
every denoising step and reads that cache. An expert-0 edit (or a knockout of prefix queries) therefore changes the
cached keys/values and so reaches every denoising step; it takes no `denoise_steps`. Expert-1 edits and knockouts of
expert-1 queries apply at their `denoise_steps` (None = every step; step 0 is t = 1, pure noise).

Knockouts mask logits before the softmax exactly as the attention mask does (upstream's finite big-negative fill): a
query whose every key is masked gets a uniform softmax over all keys, as upstream does for padding queries. Three
language knockouts, named by the path they cut:
  knockout_attention("suffix", "text") — the direct path (action-expert queries reading the text keys); language
      still reaches the actions through the image tokens, which read the text in expert 0 (the positive control
      organism still follows the prompt in 35% of (observation, prompt) pairs, chance 25%).
  knockout_attention("all", "text") — every query's read of the text keys; the prompt's length still sets the
      positions of every later token (prompts one token apart: max action change 0.22 on the fixture model).
  knockout_language() — language entirely: the text keys and the prompt-length dependence of the positions.

`Pi0.sample_actions` / `infer_with_latents` call `Intervention.validate` before compiling (errors name the fix);
`layer_edits` resolves the operations for each pass of the Gemma layer stack.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from openpi.models import intervention_kinds as kinds
from openpi.models import stream_points
from openpi.models.intervention_check import Check
from openpi.models.intervention_kinds import (
    Ablate,
    Knockout,
    LanguageKnockout,
    Operation,
    Patch,
    Steer,
    StreamEdit,
    pytree_dataclass,
)
from openpi.models.layout import Span, layout_of

__all__ = [
    "STREAM_POINTS",
    "Ablate",
    "Intervention",
    "Knockout",
    "LanguageKnockout",
    "Patch",
    "Steer",
    "StreamEdit",
    "ablate",
    "combine",
    "describe",
    "expert_segments",
    "expert_span",
    "joint_span",
    "knockout_attention",
    "knockout_language",
    "patch",
    "steer",
]

StreamPoint = stream_points.StreamPoint
STREAM_POINTS = stream_points.EDIT_POINTS


@pytree_dataclass(data=("ops",))
class Intervention:
    """Several operations applied together (in order, for edits of the same stream point). `a + b` combines."""

    ops: tuple[Operation, ...] = ()

    def __add__(self, other: Intervention) -> Intervention:
        if not isinstance(other, Intervention):
            return NotImplemented
        return Intervention(self.ops + other.ops)

    def validate(self, model_or_config, *, num_steps: int, batch: int) -> None:
        """Raises a ValueError naming the fix if any operation does not fit this model (a model, its config or its
        `TokenLayout`), sampling and batch."""
        if not isinstance(self.ops, tuple) or not all(isinstance(op, kinds.KINDS) for op in self.ops):
            raise TypeError(
                "Intervention.ops must be a tuple of operations: build it with knockout_attention, "
                "knockout_language, patch, ablate or steer and combine with +."
            )
        layout = layout_of(model_or_config)
        for i, op in enumerate(self.ops):
            op.validate(Check(layout, num_steps, batch, f"Intervention operation {i} ({op.op_name})"))

    def notes(self) -> list[str]:
        return [note for op in self.ops for note in op.notes()]


def combine(*parts: Intervention) -> Intervention:
    return functools.reduce(Intervention.__add__, parts, Intervention())


# ---------------------------------------------------------------------------------------------------------------------
# Named constructors


def _indices(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int | np.integer):
        value = (value,)
    return tuple(int(v) for v in value)


def _span(tokens, what: str) -> Span:
    if isinstance(tokens, str):
        return tokens
    try:
        start, stop = (int(t) for t in tokens)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={tokens!r} is not a token span: pass a segment name or (start, stop).") from None
    return (start, stop)


def _common(expert, tokens, layers, stream, denoise_steps):
    if expert not in (0, 1):
        raise ValueError(f"expert={expert!r}: pi0 has expert 0 (PaliGemma, prefix) and 1 (action expert, suffix).")
    if stream not in STREAM_POINTS:
        raise ValueError(f"stream={stream!r} is not a stream point: use one of {STREAM_POINTS}.")
    return dict(
        expert=int(expert),
        tokens=_span(tokens, "tokens"),
        layers=_indices(layers),
        stream=stream,
        denoise_steps=_indices(denoise_steps),
    )


def knockout_attention(queries: Span, keys: Span, layers=None, heads=None, *, denoise_steps=None) -> Intervention:
    """Remove attention from the `queries` tokens onto the `keys` tokens (masked before the softmax). With
    `denoise_steps` (expert-1 queries only) only at those denoising steps."""
    spans = _span(queries, "queries"), _span(keys, "keys")
    return Intervention((Knockout(*spans, _indices(layers), _indices(heads), _indices(denoise_steps)),))


def knockout_language() -> Intervention:
    """Remove language entirely: no query of either expert reads the text keys (every layer and denoising step), and
    positions are counted as if the prompt were absent, so nothing depends on the prompt or its length. On pi0.5 with
    `discrete_state_input` the state's digits are prompt tokens, so they are removed with it."""
    return Intervention((LanguageKnockout(),))


def patch(expert: int, tokens: Span, layers, values, *, stream: StreamPoint = "residual", denoise_steps=None):
    """Replace the stream at `tokens` by `values` [L', B, t, *feature] (e.g. another run's captured states).

    bfloat16 values (the capture's default storage dtype) warn: patching them into a float32 model is not exact;
    capture with `CaptureSpec(dtype="float32")` for exact patches."""
    values = jnp.asarray(values)
    if values.dtype == jnp.bfloat16:
        warnings.warn(
            "patch: the values are bfloat16, so an own-value patch into a float32 model is not a no-op (3.9e-3 on "
            "the fixture model); capture them with CaptureSpec(dtype='float32') to patch exactly.",
            stacklevel=2,
        )
    return Intervention((Patch(**_common(expert, tokens, layers, stream, denoise_steps), values=values),))


def ablate(
    expert: int,
    tokens: Span,
    layers,
    mode: Literal["zero", "mean"] = "zero",
    mean=None,
    *,
    stream: StreamPoint = "residual",
    denoise_steps=None,
    neurons=None,
) -> Intervention:
    """Replace the stream at `tokens` by zeros, or by `mean` ([L', *feature] or [L', B, *feature]); `mode="mean"`
    without `mean` uses the span's own mean over its valid tokens (per example and layer; padding left out).
    `neurons` (feature indices of the last axis, e.g. FFN neurons with `stream="ffn_hidden"`): only those."""
    if mode not in ("zero", "mean"):
        raise ValueError(f"ablate mode={mode!r} is not valid: use 'zero' or 'mean'.")
    if mode == "zero" and mean is not None:
        raise ValueError("ablate got a mean with mode='zero': pass mode='mean' to ablate to that mean.")
    mean = None if mean is None else jnp.asarray(mean)
    common = _common(expert, tokens, layers, stream, denoise_steps)
    return Intervention((Ablate(**common, mode=mode, mean=mean, neurons=_indices(neurons)),))


def steer(
    expert: int, tokens: Span, layers, vector, alpha=1.0, denoise_steps=None, *, stream: StreamPoint = "residual"
):
    """Add `alpha * vector` ([*feature], or [L', *feature] per layer) to the stream at `tokens`."""
    common = _common(expert, tokens, layers, stream, denoise_steps)
    return Intervention((Steer(**common, vector=jnp.asarray(vector), alpha=jnp.asarray(alpha, jnp.float32)),))


# ---------------------------------------------------------------------------------------------------------------------
# Segments (the layout's; kept here for callers that pass a model config)


def expert_segments(model_or_config: Any) -> dict[str, tuple[int, int, int]]:
    """Named token segments: name -> (expert, start, stop) over that expert's tokens (prefix / suffix)."""
    return layout_of(model_or_config).segments()


def expert_span(model_or_config: Any, expert: int, tokens: Span) -> tuple[int, int]:
    """(start, stop) of `tokens` over the expert's own tokens (assumes a validated span)."""
    return layout_of(model_or_config).expert_span(expert, tokens)


def joint_span(model_or_config: Any, tokens: Span) -> tuple[int, int]:
    """(start, stop) of `tokens` in the joint sequence [prefix | suffix] (assumes a validated span)."""
    return layout_of(model_or_config).joint_span(tokens)


def describe(iv: Intervention | None) -> dict[str, Any] | None:
    """The static structure of an intervention (for logs and manifests); arrays as their shapes; `notes` where an
    operation has something a reader must know (bf16 patch values, ...)."""
    if iv is None:
        return None
    out = []
    for op in iv.ops:
        fields = {f.name: getattr(op, f.name) for f in dataclasses.fields(op)}
        if isinstance(op, Knockout) and op.denoise_steps is None:
            del fields["denoise_steps"]  # as descriptions written before knockouts took denoise steps
        out.append({"op": op.op_name, **{k: _describe_value(v) for k, v in fields.items()}})
    notes = iv.notes()
    return {"ops": out, **({"notes": notes} if notes else {})}


def _describe_value(v):
    if hasattr(v, "shape") and hasattr(v, "dtype"):
        return {"shape": list(v.shape), "dtype": str(v.dtype)}
    return list(v) if isinstance(v, tuple) else v
