"""SigLIP ViT image encoder, as pi0 uses it (flax linen).

The param tree matches PaliGemma / openpi checkpoints under `PaliGemma/img/`:

    embedding/{kernel [p, p, 3, w] (HWIO), bias [w]}
    pos_embedding [1, n_patches, w]
    Transformer/encoderblock/...   (one scanned block; every leaf has the layer axis first)
    Transformer/encoder_norm/{scale, bias}
    head/{kernel [w, num_classes], bias}

pi0 uses `variant="So400m/14"`, `pool_type="none"`, `scan=True`, `num_classes=<VLM width>`: every 14x14 patch of a
224x224 image becomes one token, 256 per image, with no pooling and no CLS token.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


@dataclasses.dataclass(frozen=True)
class Variant:
    """Size of a ViT: `decode_variant("So400m/14")` etc."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: tuple[int, int]

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


# name -> (width, depth, mlp_dim, num_heads). Standard ViT sizes plus SigLIP's shape-optimised So400m and the
# tiny "mu" used by tests and the golden fixture.
_SIZES: dict[str, tuple[int, int, int, int]] = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
}


def decode_variant(variant: str) -> Variant:
    """Parses "<size>/<patch>", e.g. "So400m/14" or "B/16", into a `Variant`."""
    name, sep, patch = variant.partition("/")
    if not sep or not patch.isdigit():
        raise ValueError(f"SigLIP variant {variant!r} must look like '<size>/<patch>', e.g. 'So400m/14' or 'B/16'.")
    if name not in _SIZES:
        raise ValueError(f"Unknown SigLIP size {name!r} in variant {variant!r}; known sizes: {sorted(_SIZES)}.")
    width, depth, mlp_dim, num_heads = _SIZES[name]
    return Variant(width, depth, mlp_dim, num_heads, (int(patch), int(patch)))


class MlpBlock(nn.Module):
    """Dense(mlp_dim) -> gelu (tanh approximation, the flax/jax default) -> Dense(width)."""

    mlp_dim: int
    dtype_mm: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "b n w"]) -> Float[Array, "b n w"]:
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype_mm, name="Dense_0")(x)
        x = nn.gelu(x, approximate=True)
        return nn.Dense(width, dtype=self.dtype_mm, name="Dense_1")(x)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block. The (carry, output) signature lets `nn.scan` stack it over layers."""

    mlp_dim: int
    num_heads: int
    dtype_mm: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "b n w"], _: Any = None) -> tuple[Float[Array, "b n w"], Float[Array, "b n w"]]:
        y = nn.LayerNorm(name="LayerNorm_0")(x)
        # flax MHA: q/k/v/out DenseGeneral with bias, q scaled by 1/sqrt(head_dim), plain softmax, no mask.
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, dtype=self.dtype_mm, deterministic=True, name="MultiHeadDotProductAttention_0"
        )(y, y)
        x = x + y
        y = nn.LayerNorm(name="LayerNorm_1")(x)
        y = MlpBlock(self.mlp_dim, dtype_mm=self.dtype_mm, name="MlpBlock_0")(y)
        x = x + y
        # Emitting the residual stream per block is free under jit when unused (scan DCEs unused outputs).
        return x, x


class Encoder(nn.Module):
    """`depth` blocks then `encoder_norm`. Returns (encoded, per-block residual stream [depth, b, n, w])."""

    depth: int
    mlp_dim: int
    num_heads: int
    scan: bool = True
    dtype_mm: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "b n w"]) -> tuple[Float[Array, "b n w"], Float[Array, "d b n w"]]:
        if self.scan:
            # Layer axis first on every param, like the PaliGemma/openpi checkpoints.
            blocks = nn.scan(
                EncoderBlock,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.depth,
            )(self.mlp_dim, self.num_heads, self.dtype_mm, name="encoderblock")
            x, block_out = blocks(x, None)
        else:
            outs = []
            for i in range(self.depth):
                x, _ = EncoderBlock(self.mlp_dim, self.num_heads, self.dtype_mm, name=f"encoderblock_{i}")(x)
                outs.append(x)
            block_out = jnp.stack(outs)
        return nn.LayerNorm(name="encoder_norm")(x), block_out


class Module(nn.Module):
    """SigLIP ViT. `__call__(image)` returns (tokens [b, n_patches, num_classes], aux).

    aux holds "stem" [b, gh, gw, w] (conv output), "with_posemb" [b, n, w] (encoder input, f32), "block_out"
    [depth, b, n, w] (residual stream after each block), "encoded" [b, n, w] (after encoder_norm).
    """

    num_classes: int | None = None
    variant: str = "So400m/14"
    depth: int | None = None  # overrides the variant's depth
    pool_type: str = "none"  # "none": one token per patch (pi0); "gap": mean over patches
    scan: bool = True
    dtype_mm: Any = "float32"

    @nn.compact
    def __call__(
        self, image: Float[Array, "b h w 3"], *, train: bool = False
    ) -> tuple[Float[Array, "b n c"], dict[str, jax.Array]]:
        del train  # no dropout in this encoder; kept for openpi's call signature
        if self.pool_type not in ("none", "gap"):
            raise ValueError(f"pool_type={self.pool_type!r} is not supported; use 'none' (pi0) or 'gap'.")
        v = decode_variant(self.variant)
        depth = v.depth if self.depth is None else self.depth
        dtype_mm = jnp.dtype(self.dtype_mm)

        if image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"SigLIP expects images [batch, height, width, 3], got shape {image.shape}.")
        image = image.astype(jnp.float32)
        aux: dict[str, jax.Array] = {}

        # The stem and position embedding stay in f32 whatever dtype_mm is; only the encoder runs in dtype_mm.
        x = aux["stem"] = nn.Conv(
            v.width, v.patch_size, strides=v.patch_size, padding="VALID", dtype=jnp.float32, name="embedding"
        )(image)
        n, gh, gw, w = x.shape
        x = jnp.reshape(x, (n, gh * gw, w))  # row-major: patch index = row * gw + col
        posemb = self.param("pos_embedding", nn.initializers.normal(stddev=1 / w**0.5), (1, gh * gw, w), jnp.float32)
        x = aux["with_posemb"] = x + posemb.astype(jnp.float32)
        x = x.astype(dtype_mm)

        x, aux["block_out"] = Encoder(
            depth, v.mlp_dim, v.num_heads, scan=self.scan, dtype_mm=dtype_mm, name="Transformer"
        )(x)
        aux["encoded"] = x

        if self.pool_type == "gap":
            x = jnp.mean(x, axis=1, keepdims=True)
        if self.num_classes:
            x = nn.Dense(self.num_classes, dtype=dtype_mm, name="head")(x)
        return x, aux


def num_patches(variant: str, image_size: Sequence[int] = (224, 224)) -> int:
    """Tokens per image for pool_type="none" (256 for a 224x224 image and patch 14)."""
    p = decode_variant(variant).patch_size
    return (image_size[0] // p[0]) * (image_size[1] // p[1])
