"""Multi-expert Gemma: several transformers that share one attention per layer (pi0's PaliGemma + action expert).

Parameter layout and numerics follow upstream openpi exactly (see shared/spec/pi0.md section 4): expert 0 keeps the
PaliGemma names (`q_einsum`, `mlp`, ...), expert i > 0 gets the suffix `_i`; the layer stack is an `nn.scan` with the
layer index as the first param axis. The building blocks (norm, einsum, embedder, FFN, RoPE) are in `gemma_layers`.

Capture by construction: each layer returns the taps that were asked for (a residual stream entering the layer, the
attention output, ...), already reduced over tokens, and the scan stacks them per layer. Interventions
(`layer_edits.LayerEdits`) edit those streams and the attention mask in the same layer body, before the taps read
them. With no taps and no edits the program is the plain model. What a tap is, and reading captures back: `taps`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from openpi.models import layer_edits as _edits
from openpi.models import lora as _lora
from openpi.models.adarms import AdaRMSNorm, gate_of, gated_residual
from openpi.models.gemma_layers import Einsum, Embedder, FeedForward, RMSNorm, apply_rope
from openpi.models.taps import Tap, reduce_tokens

PALIGEMMA_VOCAB_SIZE = 257_152
# Upstream fills masked logits with this finite value (not -inf): rows with no valid key get a uniform softmax.
_BIG_NEG = -2.3819763e38


@dataclasses.dataclass(frozen=True)
class Config:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # LoRA per kind ("attn": every attention projection, "ffn": the feed-forward); a mapping is accepted and stored
    # as sorted (kind, LoRAConfig) pairs so the config stays hashable.
    lora_configs: tuple[tuple[str, _lora.LoRAConfig], ...] | Mapping[str, _lora.LoRAConfig] = ()

    def __post_init__(self):
        items = self.lora_configs.items() if isinstance(self.lora_configs, Mapping) else self.lora_configs
        object.__setattr__(self, "lora_configs", _lora.lora_configs(**dict(items)))

    def lora(self, kind: str) -> _lora.LoRAConfig | None:
        """The LoRA setting of `kind` ("attn" or "ffn"), None when that kind has no adapter."""
        return dict(self.lora_configs).get(kind)


def _with_lora(base: Config, rank: int, alpha: float) -> Config:
    cfg = _lora.LoRAConfig(rank=rank, alpha=alpha)
    return dataclasses.replace(base, lora_configs={"attn": cfg, "ffn": cfg})


_VARIANTS = {
    "dummy": Config(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
    "gemma_300m": Config(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_2b": Config(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
}
_VARIANTS |= {
    # openpi's low-memory fine-tuning variants (pi0_libero_low_mem_finetune).
    "gemma_2b_lora": _with_lora(_VARIANTS["gemma_2b"], rank=16, alpha=16.0),
    "gemma_300m_lora": _with_lora(_VARIANTS["gemma_300m"], rank=32, alpha=32.0),
    # Tiny LoRA variants of the fixture pi0_lora_tiny_a (alpha != rank, so a wrong scale shows).
    "dummy_lora_vlm": _with_lora(_VARIANTS["dummy"], rank=4, alpha=8.0),
    "dummy_lora_expert": _with_lora(_VARIANTS["dummy"], rank=2, alpha=1.0),
}


def get_config(variant: str) -> Config:
    """Gemma variant by name ("dummy", "gemma_300m", "gemma_2b", their LoRA forms "gemma_2b_lora", ...)."""
    if variant not in _VARIANTS:
        raise ValueError(f"Unknown Gemma variant {variant!r}; known variants: {sorted(_VARIANTS)}.")
    return _VARIANTS[variant]


def variants() -> tuple[str, ...]:
    """The names `get_config` knows."""
    return tuple(_VARIANTS)


def _name(base: str, expert: int) -> str:
    # Expert 0 keeps PaliGemma's names so the VLM loads from a PaliGemma checkpoint unchanged.
    return base if expert == 0 else f"{base}_{expert}"


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Joint attention over the concatenated tokens of all present experts (expert 0 first)."""

    configs: tuple[Config, ...]

    @nn.compact
    def __call__(self, xs, positions, attn_mask, kv_cache, key_groups, edits=None, layer=None):
        cfg0 = self.configs[0]
        num_heads, num_kv, head_dim = cfg0.num_heads, cfg0.num_kv_heads, cfg0.head_dim
        dtype = next(x.dtype for x in xs if x is not None)

        qs, ks, vs = [], [], []
        for i, (x, cfg) in enumerate(zip(xs, self.configs, strict=True)):
            if x is None:
                continue
            lora = cfg.lora("attn")
            if cfg.num_kv_heads == cfg.num_heads:
                shape = (3, cfg.num_heads, cfg.width, cfg.head_dim)
                q, k, v = Einsum(shape, batch_axis=(0, 1), lora=lora, name=_name("qkv_einsum", i))("BSD,3KDH->3BSKH", x)
            else:
                q = Einsum(
                    (cfg.num_heads, cfg.width, cfg.head_dim), batch_axis=(0,), lora=lora, name=_name("q_einsum", i)
                )("BTD,NDH->BTNH", x)
                k, v = Einsum(
                    (2, cfg.num_kv_heads, cfg.width, cfg.head_dim),
                    batch_axis=(0, 1),
                    lora=lora,
                    name=_name("kv_einsum", i),
                )("BSD,2KDH->2BSKH", x)
            qs.append(q)
            ks.append(k)
            vs.append(v)

        q = jnp.concatenate(qs, axis=1)
        k = jnp.concatenate(ks, axis=1)
        v = jnp.concatenate(vs, axis=1)

        q = apply_rope(q, positions)
        q = q * head_dim**-0.5  # after RoPE, q only
        k = apply_rope(k, positions)
        new_cache = (k, v) if kv_cache is None else None
        if kv_cache is not None:
            k = jnp.concatenate([kv_cache[0], k], axis=1)
            v = jnp.concatenate([kv_cache[1], v], axis=1)
            new_cache = (k, v)

        batch, q_len = q.shape[:2]
        q = q.reshape(batch, q_len, num_kv, num_heads // num_kv, head_dim)  # head n uses kv head n // G
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
        if attn_mask.shape[-2:] != (q_len, k.shape[1]):
            raise ValueError(f"Attention mask {attn_mask.shape} does not fit queries {q_len} x keys {k.shape[1]}.")
        mask = _edits.knock_out(edits, attn_mask[:, :, None, :, :], layer, num_kv)
        logits = jnp.where(mask, logits, _BIG_NEG)
        probs32 = jax.nn.softmax(logits, axis=-1)
        probs = probs32.astype(dtype)
        enc = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(batch, q_len, num_heads, head_dim)

        mass = None
        if key_groups is not None:
            # Attention mass onto each key group: sum of the softmax probabilities over the group's keys.
            groups = key_groups.astype(jnp.float32)
            mass = jnp.einsum("bkgts,bcs->bkgtc", probs32, groups)
            mass = mass.reshape(batch, num_heads, q_len, key_groups.shape[1])
            # The keys each query may attend to (this mask, knockouts included), all and per group: what uniform
            # attention would put on a group is its share of them.
            visible = mask.astype(jnp.float32)
            counts = jnp.concatenate(
                [visible.sum(-1, keepdims=True), jnp.einsum("bkgts,bcs->bkgtc", visible, groups)], axis=-1
            )
            shape = (batch, num_kv, num_heads // num_kv, q_len, counts.shape[-1])
            mass = (mass, jnp.broadcast_to(counts, shape).reshape(batch, num_heads, q_len, shape[-1]))

        outs, heads, start = [], [], 0
        for i, (x, cfg) in enumerate(zip(xs, self.configs, strict=True)):
            if x is None:
                outs.append(None)
                heads.append(None)
                continue
            end = start + x.shape[1]
            enc_i = _edits.edit_stream(edits, "head_out", i, enc[:, start:end], layer)
            out_proj = Einsum(
                (cfg.num_heads, cfg.head_dim, cfg.width),
                in_axis=(-3, -2),
                lora=cfg.lora("attn"),
                name=_name("attn_vec_einsum", i),
            )
            o = _edits.edit_stream(edits, "attn_out", i, out_proj("BTNH,NHD->BTD", enc_i), layer)
            outs.append(o)
            heads.append(enc_i)
            start = end
        return outs, heads, new_cache, mass


class Block(nn.Module):
    """One transformer layer for all experts; returns (new residual streams, (kv, captures)).

    `edits` (a `layer_edits.LayerEdits`, or None) change streams and the attention mask of layer `layer` before
    the taps read them, so captures show the edited streams.
    """

    configs: tuple[Config, ...]
    taps: tuple[Tap, ...] = ()
    capture_dtype: str | None = None
    adaptive_norm: tuple[bool, ...] = ()

    def _norm(self, base: str, i: int, x, adarms_cond):
        """(normed x, modulation or None): an adaptive expert's norm is an `AdaRMSNorm` fed the condition."""
        if x is None:
            return None, None
        if i < len(self.adaptive_norm) and self.adaptive_norm[i]:
            if adarms_cond is None or adarms_cond[i] is None:
                raise ValueError(f"Expert {i} uses adaptive RMSNorm (pi0.5): pass its condition in adarms_cond.")
            return AdaRMSNorm(name=_name(base, i))(x, adarms_cond[i])
        return RMSNorm(name=_name(base, i))(x), None

    @staticmethod
    def _ffn_hidden(edits, expert: int, layer, seen: list, hidden):
        # The FFN's gated product before the down projection (stream "ffn_hidden"): edited, then kept for the taps.
        seen[expert] = _edits.edit_stream(edits, "ffn_hidden", expert, hidden, layer)
        return seen[expert]

    @nn.compact
    def __call__(self, xs, positions, attn_mask, pool_weights, key_groups, adarms_cond, edits, kv_cache, layer):
        captures = {}

        def tap(stream: str, per_expert):
            for t in self.taps:
                if t.stream == stream and per_expert[t.expert] is not None:
                    weights = None if pool_weights is None else pool_weights[t.expert]
                    value = reduce_tokens(per_expert[t.expert], t.tokens, weights)
                    # Pooled reductions stay float32 whatever the capture dtype: they are small, and bf16 would put a
                    # ~1e-3 floor under relative changes (issue 10).
                    cast = self.capture_dtype and t.tokens != "pool"
                    captures[t.name] = value.astype(self.capture_dtype) if cast else value

        xs = _edits.edit_streams(edits, "residual", xs, layer)
        tap("residual", xs)
        normed, mods_attn = zip(*(self._norm("pre_attention_norm", i, x, adarms_cond) for i, x in enumerate(xs)))
        attn_outs, heads, kv, mass = Attention(self.configs, name="attn")(
            list(normed), positions, attn_mask, kv_cache, key_groups, edits, layer
        )
        tap("attn_out", attn_outs)
        tap("head_out", heads)
        xs = [None if x is None else gated_residual(x, a, gate_of(m)) for x, a, m in zip(xs, attn_outs, mods_attn)]
        xs = _edits.edit_streams(edits, "post_attn_residual", xs, layer)
        tap("post_attn_residual", xs)
        if mass is not None:
            captures["attention_mass"], captures["attention_key_counts"] = mass

        out, mods_ffw, ffn_outs, ffn_hidden = [], [], [], [None] * len(xs)
        for i, (x, cfg) in enumerate(zip(xs, self.configs, strict=True)):
            h, m = self._norm("pre_ffw_norm", i, x, adarms_cond)
            mods_ffw.append(m)
            if x is None:
                out.append(None)
                ffn_outs.append(None)
                continue
            ffn = FeedForward(cfg.mlp_dim, lora=cfg.lora("ffn"), name=_name("mlp", i))
            hidden_hook = functools.partial(self._ffn_hidden, edits, i, layer, ffn_hidden)
            ffn_outs.append(_edits.edit_stream(edits, "mlp_out", i, ffn(h, hidden_hook=hidden_hook), layer))
            out.append(gated_residual(x, ffn_outs[-1], gate_of(m)))
        tap("mlp_out", ffn_outs)
        tap("ffn_hidden", ffn_hidden)
        tap("modulation", [None if a is None else jnp.stack([a, f], axis=1) for a, f in zip(mods_attn, mods_ffw)])
        return out, (kv, captures)


class Module(nn.Module):
    """The multi-expert transformer: `embed` (expert 0's token embedding) and `__call__` (the layer stack).

    `__call__(embedded, positions, mask, *, kv_cache, pool_weights, key_groups, edits)` returns
    `(outputs, kv_cache, captures)`: per-expert outputs after each expert's final norm (None for experts not given),
    the stacked (K, V) cache [L, B, S, K, H] (K after RoPE, unscaled), and `captures[tap.name]` stacked [L, ...] per
    tap, plus `captures["attention_mass"]` [L, B, heads, T, G] when `key_groups` [B, G, S] is given, and
    `captures["attention_key_counts"]` [L, B, heads, T, 1 + G]: how many keys each query may attend to (the mask after
    any knockout), then how many of them lie in each group.
    """

    configs: tuple[Config, ...]
    embed_dtype: str = "bfloat16"
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    taps: tuple[Tap, ...] = ()
    capture_dtype: str | None = None
    # Per expert: True where its norms are adaptive (pi0.5's action expert), fed `adarms_cond` in __call__.
    adaptive_norm: tuple[bool, ...] = ()

    def setup(self):
        cfgs = tuple(self.configs)
        for attr in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            values = {getattr(c, attr) for c in cfgs}
            if len(values) != 1:
                raise ValueError(f"All experts must share {attr}; got {[getattr(c, attr) for c in cfgs]}.")
        for t in self.taps:
            if not 0 <= t.expert < len(cfgs):
                raise ValueError(f"Tap {t.name!r} asks for expert {t.expert}, but there are {len(cfgs)} experts.")
            if t.stream == "modulation" and (t.tokens != "full" or not self._adaptive(t.expert)):
                raise ValueError(f"Tap {t.name!r}: 'modulation' needs tokens='full' and an adaptive expert.")
        self.embedder = Embedder(vocab_size=self.vocab_size, width=cfgs[0].width, name="embedder")
        scanned = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 6 + (0, 0),  # kv_cache and the layer index are scanned
            length=cfgs[0].depth,
        )
        self.layers = scanned(
            configs=cfgs,
            taps=tuple(self.taps),
            capture_dtype=self.capture_dtype,
            adaptive_norm=tuple(self.adaptive_norm),
            name="layers",
        )
        self.final_norms = [
            (AdaRMSNorm if self._adaptive(i) else RMSNorm)(name=_name("final_norm", i)) for i in range(len(cfgs))
        ]

    def _adaptive(self, expert: int) -> bool:
        return expert < len(self.adaptive_norm) and self.adaptive_norm[expert]

    def embed(self, tokens: Int[Array, "b t"]) -> Float[Array, "b t d"]:
        return self.embedder.encode(tokens).astype(self.embed_dtype)

    def __call__(
        self,
        embedded: Sequence[Float[Array, "b _t _d"] | None],
        positions: Int[Array, "b t"],
        mask: Bool[Array, "b t s"],
        *,
        kv_cache: tuple[jax.Array, jax.Array] | None = None,
        pool_weights: Sequence[jax.Array | None] | None = None,
        key_groups: Float[Array, "b g s"] | None = None,
        adarms_cond: Sequence[Float[Array, "b _d"] | None] | None = None,
        edits: _edits.LayerEdits | None = None,
    ):
        if len(embedded) != len(self.configs):
            raise ValueError(f"Got {len(embedded)} inputs for {len(self.configs)} experts.")
        xs = [None if e is None else e.astype(self.embed_dtype) for e in embedded]
        attn_mask = jnp.asarray(mask)[:, None, :, :]
        pool = None if pool_weights is None else list(pool_weights)
        cond = None if adarms_cond is None else list(adarms_cond)
        layer_ids = jnp.arange(self.configs[0].depth)  # lets interventions select layers inside the scan
        xs, (kv, captures) = self.layers(xs, positions, attn_mask, pool, key_groups, cond, edits, kv_cache, layer_ids)
        outputs = []
        for i, (x, norm) in enumerate(zip(xs, self.final_norms, strict=True)):
            if x is not None and self._adaptive(i):
                x = norm(x, cond[i])[0]  # the final norm's gate is unused
            elif x is not None:
                x = norm(x)
            outputs.append(x)
        return outputs, kv, captures

    def init_all(self, batch: int = 1, tokens: tuple[int, ...] | None = None):
        """Touch every parameter (all experts present) — used for `init`."""
        tokens = tokens or (1,) * len(self.configs)
        self.embed(jnp.zeros((batch, 1), jnp.int32))
        total = sum(tokens)
        embedded = [jnp.zeros((batch, n, c.width), jnp.float32) for n, c in zip(tokens, self.configs, strict=True)]
        positions = jnp.zeros((batch, total), jnp.int32)
        mask = jnp.ones((batch, total, total), bool)
        cond = [jnp.zeros((batch, c.width)) if self._adaptive(i) else None for i, c in enumerate(self.configs)]
        return self(embedded, positions, mask, adarms_cond=cond)
