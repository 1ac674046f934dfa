"""What a `gemma.Module` call can capture, and reading it back.

A `Tap` asks one layer stream of one expert for its states, reduced over tokens on device (`reduce_tokens`); the
layer scan stacks each tap per layer. `hidden_state_taps` / `Analysis` are the residual-stream captures and their
static accessors. Free when off: a `Module` with no taps computes the plain model.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from openpi.models.stream_points import StreamPoint

Stream = StreamPoint  # the vocabulary shared with interventions (`stream_points`)


@dataclasses.dataclass(frozen=True)
class Tap:
    """One per-layer capture: a stream of one expert, reduced over its tokens.

    streams (`stream_points`, the vocabulary interventions edit too):
      residual           — the expert's residual stream entering the layer (layer 0: the embedded input).
      post_attn_residual — the residual stream after the attention block's residual add (before the FFN).
      attn_out           — the attention block's output (after the output projection, before the residual add).
      head_out           — the per-head attention output before the output projection, [.., tokens, heads, head_dim].
      mlp_out            — the FFN block's output (after the down projection, before the residual add).
      ffn_hidden         — the FFN's hidden activations: the gated product gelu(gate) * up before the down
                           projection, [.., tokens, mlp_dim] (the FFN "neurons").
      modulation         — adaptive experts only (pi0.5's action expert): the adaRMS modulation of the layer's two
                           norms, [B, 2 (pre-attention, pre-FFN), 3 (scale, shift, gate), W]; per example, not per
                           token, so `tokens` must be "full".
    tokens:
      "full"      — every token of this expert in this call.
      (start, stop) — a static token window.
      "pool"      — `pool_weights[expert] @ stream`: a weighted sum per token group ([B, G, T] weights, usually
                    masked means), computed and returned in float32 (never cast to the capture dtype).
    """

    name: str
    stream: Stream
    expert: int
    tokens: Literal["full", "pool"] | tuple[int, int] = "full"


def reduce_tokens(x: jax.Array, tokens, weights: jax.Array | None) -> jax.Array:
    """`x` [B, T, ...] reduced as a `Tap`'s `tokens` says (see `Tap`); `weights` [B, G, T] for "pool"."""
    if tokens == "full":
        return x
    if tokens == "pool":
        if weights is None:
            raise ValueError("A 'pool' tap needs pool_weights for its expert.")
        return jnp.einsum("bgt,bt...->bg...", weights.astype(jnp.float32), x.astype(jnp.float32))
    start, stop = tokens
    return x[:, start:stop]


def hidden_state_taps(num_experts: int, stream: Stream = "residual") -> tuple[Tap, ...]:
    """Taps for every expert's full residual stream, named `hidden_states_{i}` (what `Analysis` reads)."""
    return tuple(Tap(f"hidden_states_{i}", stream, i) for i in range(num_experts))


class Analysis:
    """Static accessors over the `captures` of a `Module` call made with `hidden_state_taps(...)`.

    Every array is stacked over layers: entry l is the residual stream entering layer l (l = 0: the embedded input).
    """

    @staticmethod
    def get_expert_0_hidden_states(captures: dict) -> Float[Array, "l b t0 d0"]:
        return Analysis._get(captures, 0)

    @staticmethod
    def get_expert_1_hidden_states(captures: dict) -> Float[Array, "l b t1 d1"]:
        return Analysis._get(captures, 1)

    @staticmethod
    def get_hidden_states(captures: dict) -> jax.Array | tuple[jax.Array, ...]:
        """All experts that ran, in token order: one [L, B, T, W] array if widths agree, else a per-expert tuple."""
        states = [captures[k] for k in sorted(k for k in captures if k.startswith("hidden_states_"))]
        if not states:
            raise KeyError("No hidden states in these captures: call the Module with taps=hidden_state_taps(n).")
        if len({s.shape[-1] for s in states}) == 1:
            return jnp.concatenate(states, axis=2)
        return tuple(states)

    @staticmethod
    def get_text_only_hidden_states(
        captures: dict, *, text_start: int, text_len: int, input_mask: Bool[Array, "b t0"]
    ) -> tuple[Float[Array, "l b n d0"], Bool[Array, "b n"]]:
        """Expert 0 at the text positions [text_start, text_start + text_len), with the text validity mask.

        The text range comes from the model config (pi0: cameras * tokens_per_camera .. + max_token_len); padding
        positions (mask False) carry meaningless values.
        """
        states = Analysis._get(captures, 0)
        if text_start + text_len > states.shape[2]:
            raise ValueError(f"Text window [{text_start}, {text_start + text_len}) exceeds {states.shape[2]} tokens.")
        return states[:, :, text_start : text_start + text_len], input_mask[:, text_start : text_start + text_len]

    @staticmethod
    def _get(captures: dict, expert: int):
        key = f"hidden_states_{expert}"
        if key not in captures:
            raise KeyError(f"Expert {expert} did not run or was not captured (have {sorted(captures)}).")
        return captures[key]
