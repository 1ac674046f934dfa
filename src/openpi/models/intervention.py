"""Interventions on pi0's streams, compiled into the jitted program beside the capture taps.

An `Intervention` is a pytree: its structure (which expert, stream point, layers, token span, denoising steps and
operation) is static, its arrays (patch values, means, steering vectors, alpha) are leaves. New values therefore reuse
the compiled program; a new structure compiles once. Build one from the named operations and combine with `+`:

    iv = knockout_attention("all", "text") + steer(1, "actions", layers=(3,), vector=v, alpha=2.0)

Stream points (`stream=`), per layer l, as `taps.Tap` names them:
  residual — the expert's residual stream entering layer l (l = 0: the embedded input);
  attn_out — layer l's attention output after the output projection, before the residual add;
  head_out — layer l's per-head attention output before the output projection ([.., tokens, heads, head_dim]);
  mlp_out — layer l's FFN output (after the down projection, before the residual add);
  ffn_hidden — layer l's FFN hidden activations, the gated product before the down projection ([.., tokens,
    mlp_dim]: the FFN neurons); `ablate(..., neurons=(i, ...))` / `steer` with a vector over neurons act on
    individual neurons (`openpi.models.neurons`).

Token spans: a named segment — each camera (`IMAGE_KEYS`) and "text" (expert 0), "state" and "actions" (expert 1),
"all" (every token of the expert) — or `(start, stop)` over the expert's own tokens (expert 0: the prefix, expert 1:
the suffix). Attention knockouts address the joint sequence [prefix | suffix]: the same names plus "prefix" (every
expert-0 token), "suffix" (every expert-1 token) and "all", or `(start, stop)` in joint positions.

Expert 0 and the denoising steps: expert 0 runs once, in the prefix pass, which fills the KV cache; expert 1 runs in
every denoising step and reads that cache. An expert-0 edit (or a knockout of prefix queries) therefore changes the
cached keys/values and so reaches every denoising step; it takes no `denoise_steps`. Expert-1 edits apply at their
`denoise_steps` (None = every step; step 0 is t = 1, pure noise). A knockout of expert-1 queries applies at every step.

Knockouts mask logits before the softmax exactly as the attention mask does (upstream's finite big-negative fill): a
query whose every key is masked gets a uniform softmax over all keys, as upstream does for padding queries.

`Pi0.sample_actions` / `infer_with_latents` call `Intervention.validate` before compiling (errors name the fix);
`layer_edits` compiles the operations into the Gemma layer body (a few hooks, identities when there is no edit).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from openpi.models.pi0_config import Pi0Config

StreamPoint = Literal["residual", "attn_out", "head_out", "mlp_out", "ffn_hidden"]
Span = str | tuple[int, int]
STREAM_POINTS = ("residual", "attn_out", "head_out", "mlp_out", "ffn_hidden")
_JOINT_ONLY = ("prefix", "suffix")


def pytree_dataclass(*meta: str, data: tuple[str, ...] = ()):
    """A frozen dataclass registered as a pytree: `meta` fields are static structure, `data` fields leaves."""

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))

    return wrap


# ---------------------------------------------------------------------------------------------------------------------
# Operations: static structure in meta fields, arrays as data leaves


@pytree_dataclass("queries", "keys", "layers", "heads")
class Knockout:
    queries: Span
    keys: Span
    layers: tuple[int, ...] | None
    heads: tuple[int, ...] | None


@pytree_dataclass("expert", "tokens", "layers", "stream", "denoise_steps", data=("values",))
class Patch:
    expert: int
    tokens: Span
    layers: tuple[int, ...] | None
    stream: StreamPoint
    denoise_steps: tuple[int, ...] | None
    values: jax.Array  # [L', B, t, *feature] (expert 1 may add a leading [S'] axis)


@pytree_dataclass("expert", "tokens", "layers", "stream", "denoise_steps", "mode", "neurons", data=("mean",))
class Ablate:
    expert: int
    tokens: Span
    layers: tuple[int, ...] | None
    stream: StreamPoint
    denoise_steps: tuple[int, ...] | None
    mode: Literal["zero", "mean"]
    mean: jax.Array | None  # [L', *feature] or [L', B, *feature]; None with mode="mean": the span's own mean
    neurons: tuple[int, ...] | None = None  # only these features (last axis) are ablated; None: all


@pytree_dataclass("expert", "tokens", "layers", "stream", "denoise_steps", data=("vector", "alpha"))
class Steer:
    expert: int
    tokens: Span
    layers: tuple[int, ...] | None
    stream: StreamPoint
    denoise_steps: tuple[int, ...] | None
    vector: jax.Array  # [*feature] or [L', *feature]
    alpha: jax.Array  # scalar


StreamEdit = Patch | Ablate | Steer


@pytree_dataclass(data=("ops",))
class Intervention:
    """Several operations applied together (in order, for edits of the same stream point). `a + b` combines."""

    ops: tuple[Knockout | StreamEdit, ...] = ()

    def __add__(self, other: Intervention) -> Intervention:
        if not isinstance(other, Intervention):
            return NotImplemented
        return Intervention(self.ops + other.ops)

    def validate(self, config: Pi0Config, *, num_steps: int, batch: int) -> None:
        """Raises a ValueError naming the fix if any operation does not fit this model, sampling and batch."""
        if not isinstance(self.ops, tuple) or not all(isinstance(op, Knockout | StreamEdit) for op in self.ops):
            raise TypeError(
                "Intervention.ops must be a tuple of operations: build it with knockout_attention, "
                "patch, ablate or steer and combine with +."
            )
        for i, op in enumerate(self.ops):
            _Check(config, num_steps, batch, f"Intervention operation {i} ({type(op).__name__.lower()})").op(op)


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


def knockout_attention(queries: Span, keys: Span, layers=None, heads=None) -> Intervention:
    """Remove attention from the `queries` tokens onto the `keys` tokens (masked before the softmax)."""
    return Intervention((Knockout(_span(queries, "queries"), _span(keys, "keys"), _indices(layers), _indices(heads)),))


def patch(expert: int, tokens: Span, layers, values, *, stream: StreamPoint = "residual", denoise_steps=None):
    """Replace the stream at `tokens` by `values` [L', B, t, *feature] (e.g. another run's captured states)."""
    return Intervention((Patch(**_common(expert, tokens, layers, stream, denoise_steps), values=jnp.asarray(values)),))


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
    without `mean` uses the span's own mean over its tokens (per example and layer; padding tokens included)."""
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
# Segments


def expert_segments(config: Pi0Config) -> dict[str, tuple[int, int, int]]:
    """Named token segments: name -> (expert, start, stop) over that expert's tokens (prefix / suffix)."""
    tpc = config.tokens_per_camera
    segments = {}
    for c, name in enumerate(n for n in config.segment_names if n != "text"):
        segments[name] = (0, c * tpc, (c + 1) * tpc)
    segments["text"] = (0, config.text_start, config.prefix_len)
    if config.pi05:  # no state token: the suffix is the action tokens alone
        segments["actions"] = (1, 0, config.suffix_len)
    else:
        segments["state"] = (1, 0, 1)
        segments["actions"] = (1, 1, config.suffix_len)
    return segments


def expert_span(config: Pi0Config, expert: int, tokens: Span) -> tuple[int, int]:
    """(start, stop) of `tokens` over the expert's own tokens (assumes a validated span)."""
    if tokens == "all":
        return (0, config.prefix_len if expert == 0 else config.suffix_len)
    if isinstance(tokens, str):
        return expert_segments(config)[tokens][1:]
    return tokens


def joint_span(config: Pi0Config, tokens: Span) -> tuple[int, int]:
    """(start, stop) of `tokens` in the joint sequence [prefix | suffix] (assumes a validated span)."""
    tp = config.prefix_len
    named = {"all": (0, tp + config.suffix_len), "prefix": (0, tp), "suffix": (tp, tp + config.suffix_len)}
    if tokens in named:
        return named[tokens]
    if isinstance(tokens, str):
        expert, start, stop = expert_segments(config)[tokens]
        return (start, stop) if expert == 0 else (tp + start, tp + stop)
    return tokens


def layer_tuple(layers: tuple[int, ...] | None, depth: int) -> tuple[int, ...]:
    return tuple(range(depth)) if layers is None else tuple(i % depth for i in layers)


def describe(iv: Intervention | None) -> dict[str, Any] | None:
    """The static structure of an intervention (for logs and manifests); arrays as their shapes."""
    if iv is None:
        return None
    out = []
    for op in iv.ops:
        fields = {f.name: getattr(op, f.name) for f in dataclasses.fields(op)}
        out.append({"op": type(op).__name__.lower(), **{k: _describe_value(v) for k, v in fields.items()}})
    return {"ops": out}


def _describe_value(v):
    if hasattr(v, "shape") and hasattr(v, "dtype"):
        return {"shape": list(v.shape), "dtype": str(v.dtype)}
    return list(v) if isinstance(v, tuple) else v


# ---------------------------------------------------------------------------------------------------------------------
# Validation (before compiling)


@dataclasses.dataclass(frozen=True)
class _Check:
    config: Any
    num_steps: int
    batch: int
    where: str

    def fail(self, problem: str, fix: str):
        raise ValueError(f"{self.where}: {problem}. Fix: {fix}.")

    def op(self, op) -> None:
        if isinstance(op, Knockout):
            for name in ("queries", "keys"):
                self.joint_span(name, getattr(op, name))
            self.layers(op.layers)
            n = self.config.paligemma_config.num_heads
            if op.heads is not None and (not op.heads or any(not 0 <= h < n for h in op.heads)):
                self.fail(f"heads={op.heads} do not exist (this model has {n} heads)", f"use heads in 0..{n - 1}")
            return
        self.expert_span(op.expert, op.tokens)
        layers = self.layers(op.layers)
        if op.denoise_steps is not None:
            if op.expert == 0:
                self.fail(
                    "expert 0 runs once, in the prefix pass before denoising, so denoise_steps do not apply (its "
                    "edit reaches every step through the KV cache)",
                    "drop denoise_steps, or edit expert 1",
                )
            self.indices(op.denoise_steps, self.num_steps, "denoise_steps", f"sampling runs {self.num_steps} steps")
        feature = self.feature(op.expert, op.stream)
        start, stop = expert_span(self.config, op.expert, op.tokens)
        per_layer = (len(layers), self.batch, stop - start, *feature)
        if isinstance(op, Patch):
            n_steps = self.num_steps if op.denoise_steps is None else len(op.denoise_steps)
            allowed = [per_layer] + ([(n_steps, *per_layer)] if op.expert == 1 else [])
            self.shape("values", op.values, allowed, "[L', B, t, *feature] as the capture keys hold them")
        if isinstance(op, Ablate) and op.neurons is not None:
            self.indices(op.neurons, feature[-1], "neurons", f"the stream has {feature[-1]} features")
        if isinstance(op, Ablate) and op.mean is not None:
            allowed = [(len(layers), *feature), (len(layers), self.batch, *feature)]
            self.shape("mean", op.mean, allowed, "[L', *feature] or [L', B, *feature]")
        elif isinstance(op, Steer):
            self.shape("vector", op.vector, [feature, (len(layers), *feature)], "[*feature] or [L', *feature]")
            self.shape("alpha", op.alpha, [()], "a scalar")

    def layers(self, layers) -> tuple[int, ...]:
        depth = self.config.depth
        if layers is not None:
            self.indices(layers, depth, "layers", f"this model has {depth} layers")
        return layer_tuple(layers, depth)

    def indices(self, values, n: int, what: str, size: str) -> None:
        if not values:
            self.fail(f"{what} is empty", "pass None for all, or at least one index")
        bad = [v for v in values if not -n <= v < n]
        if bad:
            self.fail(f"{what} {bad} do not exist: {size}", f"use indices in 0..{n - 1} (negative counts from the end)")
        if len({v % n for v in values}) != len(values):
            self.fail(f"{what} {list(values)} repeat an index", "list each index once")

    def feature(self, expert: int, stream: str) -> tuple[int, ...]:
        cfg = (self.config.paligemma_config, self.config.action_expert_config)[expert]
        if stream == "ffn_hidden":
            return (cfg.mlp_dim,)
        return (cfg.num_heads, cfg.head_dim) if stream == "head_out" else (cfg.width,)

    def expert_span(self, expert: int, tokens: Span) -> None:
        segments = expert_segments(self.config)
        own = ["all", *(k for k, v in segments.items() if v[0] == expert)]
        if isinstance(tokens, str):
            if tokens in segments and segments[tokens][0] != expert:
                self.fail(
                    f"{tokens!r} is a token segment of expert {segments[tokens][0]}, not expert {expert}",
                    f"edit expert {segments[tokens][0]}, or use one of {own} for expert {expert}",
                )
            if tokens not in own:
                self.fail(f"unknown token segment {tokens!r}", f"use one of {own} or (start, stop)")
            return
        n = self.config.prefix_len if expert == 0 else self.config.suffix_len
        if not 0 <= tokens[0] < tokens[1] <= n:
            self.fail(
                f"tokens={tokens} is not a window of expert {expert}'s {n} tokens", f"use 0 <= start < stop <= {n}"
            )

    def joint_span(self, name: str, tokens: Span) -> None:
        known = ["all", *_JOINT_ONLY, *expert_segments(self.config)]
        if isinstance(tokens, str):
            if tokens not in known:
                self.fail(f"{name}: unknown token segment {tokens!r}", f"use one of {known} or (start, stop)")
            return
        n = self.config.prefix_len + self.config.suffix_len
        if not 0 <= tokens[0] < tokens[1] <= n:
            self.fail(
                f"{name}={tokens} is not a window of the {n} joint tokens [prefix | suffix]",
                f"use 0 <= start < stop <= {n}",
            )

    def shape(self, what: str, value, allowed: list[tuple[int, ...]], form: str) -> None:
        shape = tuple(getattr(value, "shape", ()))
        if shape not in [tuple(a) for a in allowed]:
            self.fail(f"{what} has shape {list(shape)}", f"pass {form}: {' or '.join(str(list(a)) for a in allowed)}")
