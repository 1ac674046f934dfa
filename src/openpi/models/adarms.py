"""pi0.5's adaptive RMSNorm and gated residual (the action expert only; shared/spec/pi05.md section 3).

An adaptive norm has no `scale` leaf: it owns one Dense (`Dense_0`, kernel [W, 3W], zero-initialised upstream) that
maps the condition c [B, W] (the time MLP's output) to a per-example modulation, laid out [scale | shift | gate]:

    normed = x / sqrt(mean(x^2) + 1e-6)          (float32)
    y      = normed * (1 + scale) + shift        (float32, cast back to x's dtype)

and the layer adds its residual branch times `gate`. The final norm's gate is discarded.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


class AdaRMSNorm(nn.Module):
    """RMSNorm modulated by a condition; returns (normed x, modulation [B, 3, W] = (scale, shift, gate))."""

    @nn.compact
    def __call__(
        self, x: Float[Array, "b t w"], cond: Float[Array, "b w"]
    ) -> tuple[Float[Array, "b t w"], Float[Array, "b 3 w"]]:
        dtype = x.dtype
        width = x.shape[-1]
        # The Dense computes in the activation dtype (bf16 on the deployed path), as upstream's does.
        mod = nn.Dense(3 * width, kernel_init=nn.initializers.zeros, dtype=dtype)(cond)
        mod = mod.reshape(mod.shape[0], 3, width)  # [scale | shift | gate] along the last axis
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = x32 * jnp.reciprocal(jnp.sqrt(var + 1e-6))
        scale, shift = mod[:, 0, None, :], mod[:, 1, None, :]
        return (normed * (1 + scale) + shift).astype(dtype), mod


def gate_of(modulation: jax.Array | None) -> jax.Array | None:
    """The gate [B, 1, W] of a modulation (None for a plain norm)."""
    return None if modulation is None else modulation[:, 2, None, :]


def gated_residual(x: jax.Array, branch: jax.Array, gate: jax.Array | None) -> jax.Array:
    """`x + branch` (pi0, expert 0) or `x + branch * gate` (pi0.5's action expert)."""
    return x + branch if gate is None else x + branch * gate
