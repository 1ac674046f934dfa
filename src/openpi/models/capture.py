"""What to capture from pi0 during inference, and how much of it to keep.

A `CaptureSpec` is static (hashable): it is a `jax.jit` static argument, so every reduction it asks for is compiled
into the inference program and only what is kept leaves the device. `CaptureSpec.off()` compiles to the plain model.

Streams (see docs/INTERFACES.md for the exact keys and shapes):

* `expert_0`: the PaliGemma residual stream entering each layer during the prefix pass. "full" keeps every prefix
  token; "pooled" keeps the masked mean of each camera's tokens and of the text tokens (over valid tokens only).
* `text`: expert 0 at the text positions only (the "text window", `max_token_len` tokens), with its validity mask.
* `expert_1`: the action-expert residual stream entering each layer at each denoising step. "pooled" keeps the
  state token and the mean of the action tokens.
* `attention_to_text`: attention mass (summed softmax probability) from each expert-1 query, per layer, head and
  denoising step, onto three key groups (`sampling.ATTENTION_KEY_GROUPS`): every valid text key
  (`attention_to_text`), the text content keys without BOS and the trailing "\\n" (`attention_to_text_content`), and
  BOS alone (`attention_to_bos`); plus `attention_key_counts`, how many keys each query may attend to and how many of
  them are in each group (per layer and head, once: the mask does not change between denoising steps), so that a
  mass can be compared with uniform attention (its share of the visible keys).
* `trajectory`: the flow-matching path x_t (before each step and the final x_0) and the velocities v_t.
* `final_norm`: expert 0's output after its final RMSNorm (what the tied unembedding reads) at the text positions,
  the entry after the last layer (the residual entries are the streams *entering* each layer).
* `ffn`: each expert's FFN hidden activations (gelu(gate) * up, [.., mlp_dim], before the down projection) per layer
  (expert 1: per denoising step), pooled like the residual streams or at full token resolution.
* `modulation` (pi0.5 only): the adaptive-norm modulation (scale, shift, gate) of each action-expert layer at each
  denoising step, and the time condition it is computed from.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

StreamMode = Literal["off", "pooled", "full"]
StorageDtype = Literal["bfloat16", "float16", "float32"]


@dataclasses.dataclass(frozen=True)
class CaptureSpec:
    """Which latents `Pi0.infer_with_latents` returns; applied inside the jitted function."""

    # Expert 0 (VLM) residual stream in the prefix pass: "off", "pooled" (per-camera + text means) or "full".
    expert_0: StreamMode = "pooled"
    # Expert 1 (action expert) residual stream per denoising step: "off", "pooled" (state, action mean) or "full".
    expert_1: StreamMode = "pooled"
    # Expert 0 at the text positions (the text window), with `text_mask`.
    text: bool = True
    # Attention mass from expert-1 queries onto the valid text keys, the text content keys and BOS, per denoising step
    # / layer / head, and the visible-key counts that normalise them.
    attention_to_text: bool = True
    # The denoising trajectory x_t and the velocities v_t.
    trajectory: bool = True
    # Layers to keep (None = all). Layer l's entry is the residual stream *entering* layer l.
    layers: tuple[int, ...] | None = None
    # Denoising steps to keep for the expert-1 streams (None = all). Step 0 is t = 1.0 (pure noise).
    denoise_steps: tuple[int, ...] | None = None
    # Storage dtype of hidden states (attention masses and the trajectory stay float32). "float32" keeps a float32
    # model's states exactly, so they can be patched back as an exact no-op (bf16 captures are off by ~1e-3).
    dtype: StorageDtype = "bfloat16"
    # pi0.5 only: each action-expert layer's adaRMS (scale, shift, gate) per denoising step, plus `adarms_cond`.
    modulation: bool = False
    # Expert 0's final output after its final norm, at the text positions (`text_only_final_norm`); off by default.
    final_norm: bool = False
    # The FFN hidden activations (the gated product before the down projection, the "neurons") of both experts:
    # "pooled" (expert 0: per-camera + text means; expert 1: state token, action mean), "full", or "off".
    ffn: StreamMode = "off"

    def __post_init__(self):
        for field in ("expert_0", "expert_1", "ffn"):
            value = getattr(self, field)
            if value not in ("off", "pooled", "full"):
                raise ValueError(f"CaptureSpec.{field}={value!r} is not valid: use 'off', 'pooled' or 'full'.")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"CaptureSpec.dtype={self.dtype!r} is not valid: use 'bfloat16', 'float16' or 'float32'.")
        # Normalise lists (e.g. from a CLI or JSON) to tuples so the spec stays hashable.
        for field in ("layers", "denoise_steps"):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, tuple(int(v) for v in value))

    @classmethod
    def off(cls) -> CaptureSpec:
        """Capture nothing: the compiled program is the plain model."""
        return cls(expert_0="off", expert_1="off", text=False, attention_to_text=False, trajectory=False)

    @classmethod
    def everything(cls) -> CaptureSpec:
        """Every stream at full token resolution, every layer and denoising step."""
        return cls(expert_0="full", expert_1="full", text=True, attention_to_text=True, trajectory=True)

    @property
    def is_off(self) -> bool:
        return self == CaptureSpec.off()

    def layer_indices(self, depth: int) -> tuple[int, ...]:
        """The captured layers for a model of `depth` layers; raises a clear error for ones that do not exist."""
        return _resolve_indices(
            self.layers, depth, what="Capture layer(s)", size=f"this model has {depth} layers", flag="layers"
        )

    def step_indices(self, num_steps: int) -> tuple[int, ...]:
        """The captured denoising steps out of `num_steps`; raises a clear error for ones that do not exist."""
        return _resolve_indices(
            self.denoise_steps,
            num_steps,
            what="Capture denoising step(s)",
            size=f"sampling runs {num_steps} steps",
            flag="denoise_steps",
        )

    def validate(self, *, depth: int, num_steps: int) -> None:
        """Check that the spec fits a model with `depth` layers sampled with `num_steps` steps."""
        self.layer_indices(depth)
        self.step_indices(num_steps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CaptureSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown CaptureSpec field(s) {unknown}; known fields: {sorted(known)}.")
        return cls(**data)


def _resolve_indices(indices: tuple[int, ...] | None, n: int, *, what: str, size: str, flag: str) -> tuple[int, ...]:
    """`indices` (None = all, negative counts from the end) as non-negative indices into range(n)."""
    if indices is None:
        return tuple(range(n))
    bad = [i for i in indices if not -n <= i < n]
    if bad:
        raise ValueError(
            f"{what} {bad} do not exist: {size} (valid indices 0..{n - 1}). "
            f"Fix CaptureSpec.{flag} (--capture.{flag.replace('_', '-')})."
        )
    if not indices:
        raise ValueError(f"CaptureSpec.{flag} is empty: pass None for all or list at least one index.")
    return tuple(i % n for i in indices)
