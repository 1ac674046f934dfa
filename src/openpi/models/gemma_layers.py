"""Gemma's building blocks: RMSNorm, the (LoRA-capable) einsum projection, the token embedder, the GeGLU
feed-forward and rotary position embedding. Parameter names and numerics are upstream openpi's (shared/spec/pi0.md
section 4); `gemma` assembles them into the multi-expert attention, layer and stack.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from openpi.models import lora as _lora


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        dtype = x.dtype
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = x32 * jnp.reciprocal(jnp.sqrt(var + 1e-6))
        return (normed * (1 + scale)).astype(dtype)  # scale is stored as an offset from 1


class Einsum(nn.Module):
    shape: tuple[int, ...]
    in_axis: int = -2
    out_axis: int = -1
    batch_axis: tuple[int, ...] = ()
    lora: _lora.LoRAConfig | None = None  # adds params `lora_a`, `lora_b` beside `w`

    @nn.compact
    def __call__(self, eqn: str, x):
        init = nn.initializers.lecun_normal(in_axis=self.in_axis, out_axis=self.out_axis, batch_axis=self.batch_axis)
        w = self.param("w", init, self.shape)
        y = jnp.einsum(eqn, x, w.astype(x.dtype))  # weights follow the activation dtype
        if self.lora is not None:
            a, b = _lora.factors(self, "", self.shape, self.lora)
            y = y + _lora.einsum_delta(eqn, x, a, b, self.lora)
        return y


class Embedder(nn.Module):
    vocab_size: int
    width: int

    def setup(self):
        self.input_embedding = self.param(
            "input_embedding", nn.initializers.normal(stddev=1.0), (self.vocab_size, self.width)
        )

    def encode(self, tokens):
        x = self.input_embedding[(tokens,)]
        return x * jnp.sqrt(self.width).astype(x.dtype)


class FeedForward(nn.Module):
    """GeGLU with tanh-approximate gelu; params `gating_einsum` [2, D, F] and `linear` [F, D].

    With `lora`, each of the three matmuls adds `(x @ A) @ B` unscaled (upstream ignores alpha here); params
    `gating_einsum_lora_{a,b}` [2, D, r], [2, r, F] and `linear_lora_{a,b}` [F, r], [r, D].
    """

    mlp_dim: int
    lora: _lora.LoRAConfig | None = None

    @nn.compact
    def __call__(self, x, hidden_hook=None):
        """`hidden_hook(hidden)` (optional) sees and may replace the gated product [.., mlp_dim] before the down
        projection (the FFN neurons)."""
        width = x.shape[-1]
        gating = self.param(
            "gating_einsum",
            nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)),
            (2, width, self.mlp_dim),
        ).astype(x.dtype)
        gate = jnp.dot(x, gating[0])
        up = jnp.dot(x, gating[1])
        if self.lora is not None:
            ga, gb = _lora.factors(self, "gating_einsum_", (2, width, self.mlp_dim), self.lora)
            gate = gate + _lora.dot_delta(x, ga[0], gb[0])
            up = up + _lora.dot_delta(x, ga[1], gb[1])
        gate = nn.gelu(gate)  # approximate=True: the tanh form upstream uses
        linear = self.param("linear", nn.initializers.lecun_normal(), (self.mlp_dim, width)).astype(x.dtype)
        hidden = gate * up
        if hidden_hook is not None:
            hidden = hidden_hook(hidden)
        out = jnp.dot(hidden, linear)
        if self.lora is not None:
            la, lb = _lora.factors(self, "linear_", (self.mlp_dim, width), self.lora)
            out = out + _lora.dot_delta(hidden, la, lb)
        return out


def apply_rope(x, positions, max_wavelength: int = 10_000):
    """Rotary embedding, half-split convention; computed in float32 and cast back."""
    half = x.shape[-1] // 2
    freq_exponents = (2.0 / x.shape[-1]) * jnp.arange(half, dtype=jnp.float32)
    timescale = max_wavelength**freq_exponents
    angle = positions[..., None] / timescale[None, None, :]
    angle = angle[..., None, :]  # broadcast over heads
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
