"""LoRA adapters as upstream openpi applies them (shared/spec/pi0.md section 14), applied at run time.

Run time rather than merged kernels: it is upstream's computation in every dtype (a merged-then-cast bf16 kernel rounds
differently, by about the bf16-vs-float32 spread), and capture taps see the adapted streams with no extra code.

* Attention einsums: `y = einsum(eqn, x, W) + s * einsum(eqn_b, einsum(eqn_a, x, A), B)` with s = `scaling_value`.
  `eqn_a` renames the weight's output label to the LoRA label, `eqn_b` its input label; every other weight label
  stays on both factors (so attn_vec's second factor is summed over heads).
* FFN: each of the three matmuls adds `(x @ A) @ B` **without** the scale (alpha has no effect there).

Both factors are cast to the activation dtype right before use, like the base weights.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# Keys of `gemma.Config.lora_configs` that mean something: all attention projections, the feed-forward.
KINDS = ("attn", "ffn")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """One adapter setting. Both factors are initialised N(0, init_std²) (upstream: not zero for B)."""

    rank: int
    alpha: float = 1.0
    rslora: bool = False
    # Weight axes (input, output) that the factors replace by the rank: A replaces the output axis, B the input one.
    axes: tuple[int, int] = (-2, -1)
    label: str = "L"  # einsum label of the rank axis
    init_std: float = 0.01

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be >= 1, got {self.rank}.")
        if len(self.label) != 1:
            raise ValueError(f"LoRAConfig.label must be one einsum letter, got {self.label!r}.")

    @property
    def scaling_value(self) -> float:
        """alpha / rank, or alpha / sqrt(rank) with rslora. Used by the attention einsums only."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def factor_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (A, B) for a weight of `shape`: A has the output axis, B the input axis, replaced by the rank."""
        a, b = list(shape), list(shape)
        a[self.axes[1]] = self.rank
        b[self.axes[0]] = self.rank
        return tuple(a), tuple(b)

    def equations(self, eqn: str) -> tuple[str, str]:
        """(eqn_a, eqn_b) from a base equation `x,w->y`: `BTNH,NHD->BTD` gives `BTNH,NHL->BTL` and `BTL,NLD->BTD`."""
        lhs, out = eqn.replace(" ", "").split("->")
        w_spec = lhs.split(",")[1]
        if self.label in eqn:
            raise ValueError(f"LoRA label {self.label!r} already appears in the einsum {eqn!r}; pick another label.")
        in_label, out_label = w_spec[self.axes[0]], w_spec[self.axes[1]]
        eqn_a = eqn.replace(" ", "").replace(out_label, self.label)
        a_out = out.replace(out_label, self.label)
        eqn_b = f"{a_out},{w_spec.replace(in_label, self.label)}->{out}"
        return eqn_a, eqn_b


def lora_configs(**kinds: LoRAConfig) -> tuple[tuple[str, LoRAConfig], ...]:
    """The hashable form `gemma.Config.lora_configs` stores, e.g. `lora_configs(attn=LoRAConfig(16, 16.0), ...)`."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"Unknown LoRA kind(s) {unknown}: only {list(KINDS)} are applied.")
    return tuple(sorted(kinds.items()))


def is_lora_path(path: str) -> bool:
    """True for a LoRA leaf path (`.../lora_a`, `.../gating_einsum_lora_b`, ...): upstream's `.*lora.*`."""
    return "lora" in path


def factors(module: nn.Module, prefix: str, shape: tuple[int, ...], cfg: LoRAConfig) -> tuple[jax.Array, jax.Array]:
    """Declares the (A, B) params of `module` for a weight of `shape`, named `{prefix}lora_a` / `{prefix}lora_b`."""
    init = nn.initializers.normal(stddev=cfg.init_std)
    a_shape, b_shape = cfg.factor_shapes(shape)
    return module.param(f"{prefix}lora_a", init, a_shape), module.param(f"{prefix}lora_b", init, b_shape)


def einsum_delta(eqn: str, x: jax.Array, a: jax.Array, b: jax.Array, cfg: LoRAConfig) -> jax.Array:
    """The scaled adapter term of an attention einsum, in x's dtype."""
    eqn_a, eqn_b = cfg.equations(eqn)
    low = jnp.einsum(eqn_a, x, a.astype(x.dtype))
    return jnp.einsum(eqn_b, low, b.astype(x.dtype)) * cfg.scaling_value  # a Python float keeps x's dtype


def dot_delta(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """The unscaled adapter term of an FFN matmul, `(x @ A) @ B`, in x's dtype."""
    return jnp.dot(jnp.dot(x, a.astype(x.dtype)), b.astype(x.dtype))
