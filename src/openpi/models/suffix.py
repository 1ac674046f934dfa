"""The action expert's input (the "suffix"): pi0's state + action-time tokens, pi0.5's action tokens and time condition.

pi0 (shared/spec/pi0.md): [state token | action_time_mlp(action_in_proj(x_t), posemb(t))], ar mask
[True, True, False...].
pi0.5 (shared/spec/pi05.md sections 4-5): the H tokens action_in_proj(x_t) (no state token, no time mixing), ar mask
[True, False...]; the time enters as the adaRMS condition swish(time_mlp_out(swish(time_mlp_in(posemb(t))))).
"""

from __future__ import annotations

from typing import Any

import einops
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


def posemb_sincos(pos: Float[Array, " b"], dim: int, min_period: float, max_period: float) -> Float[Array, "b d"]:
    """Sine-cosine embedding of a scalar per example: [sin | cos] over `dim // 2` geometric periods."""
    if dim % 2:
        raise ValueError(f"posemb_sincos needs an even dimension, got {dim}.")
    fraction = jnp.linspace(0.0, 1.0, dim // 2)
    period = min_period * (max_period / min_period) ** fraction
    angle = jnp.einsum("i,j->ij", pos, 1.0 / period * 2 * jnp.pi, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


def linear(p: dict, x: jax.Array) -> jax.Array:
    # nnx.Linear semantics: compute in the promoted dtype of input and params.
    dtype = jnp.result_type(x, p["kernel"], p["bias"])
    return jnp.dot(x.astype(dtype), p["kernel"].astype(dtype)) + p["bias"].astype(dtype)


def _time_embedding(timestep: Float[Array, " b"], width: int) -> Float[Array, "b w"]:
    return posemb_sincos(timestep, width, min_period=4e-3, max_period=4.0)


def embed_suffix_pi0(
    params: dict[str, Any],
    state: Float[Array, "b s"],
    noisy_actions: Float[Array, "b h a"],
    timestep: Float[Array, " b"],
) -> tuple[Float[Array, "b ts d"], Bool[Array, "b ts"], Bool[Array, " ts"]]:
    """pi0: [state token | action_time_mlp(action_in_proj(x_t), posemb(t))]; state is causal to the actions."""
    horizon = noisy_actions.shape[1]
    state_token = linear(params["state_proj"], state)[:, None, :]
    action_tokens = linear(params["action_in_proj"], noisy_actions)
    time_tokens = einops.repeat(_time_embedding(timestep, action_tokens.shape[-1]), "b d -> b h d", h=horizon)
    x = jnp.concatenate([action_tokens, time_tokens], axis=-1)
    x = linear(params["action_time_mlp_out"], jax.nn.swish(linear(params["action_time_mlp_in"], x)))
    tokens = jnp.concatenate([state_token, x], axis=1)
    input_mask = jnp.ones((tokens.shape[0], 1 + horizon), dtype=bool)
    ar_mask = jnp.array([True, True] + [False] * (horizon - 1))
    return tokens, input_mask, ar_mask


def embed_suffix_pi05(
    params: dict[str, Any], noisy_actions: Float[Array, "b h a"]
) -> tuple[Float[Array, "b h d"], Bool[Array, "b h"], Bool[Array, " h"]]:
    """pi0.5: the H action tokens action_in_proj(x_t); they attend to the prefix and to each other."""
    batch, horizon = noisy_actions.shape[:2]
    tokens = linear(params["action_in_proj"], noisy_actions)
    return tokens, jnp.ones((batch, horizon), dtype=bool), jnp.array([True] + [False] * (horizon - 1))


def adarms_condition_pi05(params: dict[str, Any], timestep: Float[Array, " b"]) -> Float[Array, "b w"]:
    """pi0.5's condition of every adaptive norm: swish(time_mlp_out(swish(time_mlp_in(posemb(t)))))."""
    emb = _time_embedding(timestep, params["time_mlp_in"]["kernel"].shape[0])
    return jax.nn.swish(linear(params["time_mlp_out"], jax.nn.swish(linear(params["time_mlp_in"], emb))))
