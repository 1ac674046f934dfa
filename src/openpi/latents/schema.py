"""The latent record schema: every key one collected rollout step can hold, defined once.

A record is one inference of one rollout step (docs/INTERFACES.md, "One collected rollout step"). Each key has its
per-step axis names (without the leading rollout-step axis the store adds), its dtype, the stream that produces it
and whether a record may lack it. A counterfactual rerun of the same step with another prompt stores its values under
``cf_<key>`` (:data:`CF_PREFIX`), with the axes and dtype of ``<key>``; those keys may come and go from one rollout
step to the next (the store keeps them sparse).

Pure numpy / stdlib (``ml_dtypes`` only names bfloat16): reading a store must never import model code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

import ml_dtypes
import numpy as np

CF_PREFIX = "cf_"
# "capture": the hidden-state dtype the CaptureSpec asks for (bfloat16, float16 or float32).
CAPTURE_DTYPE = "capture"
STRING_DTYPE = "string"

Stream = Literal[
    "rollout", "policy", "env", "model", "expert_0", "expert_1", "text", "attention_to_text", "trajectory", "modulation"
]


@dataclasses.dataclass(frozen=True)
class RecordKey:
    """One key of a latent record.

    ``stream``: the CaptureSpec stream that produces it (``expert_0``, ``expert_1``, ``text``,
    ``attention_to_text``, ``trajectory``); ``model`` for model outputs present with any capture; ``policy`` /
    ``env`` / ``rollout`` for what the policy, the simulator and the collection loop add. ``optional``: a record may
    lack the key (it depends on the CaptureSpec or a collection argument). ``dims`` None: the store names the axes
    ``dim_0, dim_1, ...`` (format version 1 gave this key no axis names; kept so stores stay byte-identical).
    """

    name: str
    dims: tuple[str, ...] | None
    dtype: str  # numpy dtype name, CAPTURE_DTYPE or STRING_DTYPE
    stream: Stream
    optional: bool


def _keys(*keys: RecordKey) -> dict[str, RecordKey]:
    return {k.name: k for k in keys}


_HIDDEN = ("layer", "batch", "token", "width")
_ATTENTION = ("denoise_step", "layer", "batch", "head", "query")
# The attention captures: mass on every valid text key, on the text content keys (without BOS and the trailing "\n")
# and on BOS (openpi.models.sampling.ATTENTION_KEY_GROUPS), and the key_group axis of attention_key_counts.
ATTENTION_KEYS = ("attention_to_text", "attention_to_text_content", "attention_to_bos")
ATTENTION_COUNT_GROUPS = ("visible", "text", "text_content", "bos")
_SEGMENTS = ("layer", "batch", "segment", "width")
RECORD_KEYS: dict[str, RecordKey] = _keys(
    RecordKey("t", (), "int64", "rollout", False),  # env timestep (after the wait steps)
    RecordKey("prompt", (), STRING_DTYPE, "rollout", False),
    # The policy server's records (openpi.serving): when the request arrived (unix seconds), and the request's own
    # prompt when the server replaced it (--prompt blank / text).
    RecordKey("received_time", (), "float64", "rollout", True),
    RecordKey("sent_prompt", (), STRING_DTYPE, "rollout", True),
    RecordKey("executed_actions", ("executed", "action_dim"), "float32", "rollout", False),
    RecordKey("actions", ("horizon", "action_dim"), "float32", "policy", False),
    RecordKey("model_actions", ("horizon", "model_action_dim"), "float32", "policy", False),
    RecordKey("noise", None, "float32", "policy", False),
    RecordKey("state", ("state_dim",), "float32", "env", False),
    RecordKey("image", ("height", "width", "channel"), "uint8", "env", True),
    RecordKey("wrist_image", ("height", "width", "channel"), "uint8", "env", True),
    RecordKey("text_mask", ("batch", "token"), "bool", "model", False),
    RecordKey("tokenized_prompt", ("batch", "token"), "int32", "model", False),
    RecordKey("segment_mask", None, "bool", "model", False),
    RecordKey("denoise_times", ("denoise_step",), "float32", "model", False),
    RecordKey("expert_0_hidden_states", _HIDDEN, CAPTURE_DTYPE, "expert_0", True),
    # pooled captures are float32 whatever the capture dtype (small; bf16 floors relative changes at ~1e-3)
    RecordKey("expert_0_segment_means", _SEGMENTS, "float32", "expert_0", True),
    RecordKey("text_only_hidden_states", _HIDDEN, CAPTURE_DTYPE, "text", True),
    # CaptureSpec.final_norm: expert 0's output after its final norm at the text positions (after the last layer).
    RecordKey("text_only_final_norm", ("batch", "token", "width"), CAPTURE_DTYPE, "text", True),
    RecordKey("expert_1_hidden_states", ("denoise_step", *_HIDDEN), CAPTURE_DTYPE, "expert_1", True),
    RecordKey("expert_1_segment_means", ("denoise_step", *_SEGMENTS), "float32", "expert_1", True),
    # CaptureSpec.attention_to_text: each expert-1 query's attention mass on every valid text key, on the text content
    # keys (BOS and the last valid text key, pi0's trailing "\n", left out) and on BOS; stores written before the
    # content / BOS keys existed hold attention_to_text only.
    *(RecordKey(k, _ATTENTION, "float32", "attention_to_text", True) for k in ATTENTION_KEYS),
    # the number of keys each query may attend to (mask after any knockout), then of them in each key group
    # (ATTENTION_COUNT_GROUPS); the same at every denoising step, so stored once
    RecordKey(
        "attention_key_counts", ("layer", "batch", "head", "query", "key_group"), "float32", "attention_to_text", True
    ),
    # pi0.5 only (CaptureSpec.modulation): adaptive-norm (scale, shift, gate) of the pre-attention / pre-FFN norms.
    RecordKey(
        "expert_1_modulation",
        ("denoise_step", "layer", "batch", "norm", "component", "width"),
        CAPTURE_DTYPE,
        "modulation",
        True,
    ),
    RecordKey("adarms_cond", ("denoise_step", "batch", "width"), CAPTURE_DTYPE, "modulation", True),
    # CaptureSpec.ffn: the FFN hidden activations (gated product before the down projection), pooled or full.
    RecordKey("expert_0_ffn_means", ("layer", "batch", "segment", "neuron"), "float32", "ffn", True),
    RecordKey("expert_0_ffn_hidden", ("layer", "batch", "token", "neuron"), CAPTURE_DTYPE, "ffn", True),
    RecordKey("expert_1_ffn_means", ("denoise_step", "layer", "batch", "segment", "neuron"), "float32", "ffn", True),
    RecordKey("expert_1_ffn_hidden", ("denoise_step", "layer", "batch", "token", "neuron"), CAPTURE_DTYPE, "ffn", True),
    RecordKey("x_t", ("denoise_point", "batch", "horizon", "action_dim"), "float32", "trajectory", True),
    RecordKey("v_t", ("denoise_step", "batch", "horizon", "action_dim"), "float32", "trajectory", True),
)


# A teacher-forced counterfactual rerun (the baseline's x_t fed at every denoising step, so only the prompt differs:
# `Policy.infer_with_latents(x_t_sequence=)`) stores its values under ``cf_tf_<key>``.
CF_TF_PREFIX = "cf_tf_"


def teacher_forced(key: str) -> str:
    """The key under which a teacher-forced counterfactual rerun stores ``key``."""
    return CF_TF_PREFIX + key


def is_counterfactual(key: str) -> bool:
    """Whether ``key`` holds a counterfactual rerun's value (such keys may be missing on some rollout steps)."""
    return key.startswith(CF_PREFIX)


def counterfactual(key: str) -> str:
    """The key under which a counterfactual rerun stores ``key``."""
    return CF_PREFIX + key


def base_key(key: str) -> str:
    """``key`` without the counterfactual prefix."""
    if key.startswith(CF_TF_PREFIX):
        return key[len(CF_TF_PREFIX) :]
    return key[len(CF_PREFIX) :] if is_counterfactual(key) else key


def record_key(key: str) -> RecordKey | None:
    """The schema entry of ``key`` (a ``cf_`` key has its base key's entry), or None for a key the schema lacks."""
    return RECORD_KEYS.get(base_key(key))


def dims_for(key: str, ndim: int) -> tuple[str, ...]:
    """Per-step axis names of ``key`` (without the leading "step" axis); generic names for unknown keys."""
    entry = record_key(key)
    if entry is not None and entry.dims is not None and len(entry.dims) == ndim:
        return entry.dims
    return tuple(f"dim_{i}" for i in range(ndim))


def nbytes(shape: tuple[int, ...] | list[int], dtype: Any) -> int:
    """Bytes of an array of ``shape`` and ``dtype`` (a numpy dtype, a dtype name incl. "bfloat16")."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        dtype = ml_dtypes.bfloat16
    return int(math.prod(shape)) * np.dtype(dtype).itemsize


def estimate_bytes(record: Mapping[str, Any]) -> int:
    """Uncompressed bytes one rollout step (one inference) adds to the store.

    ``record`` maps keys to arrays, to objects with ``shape``/``dtype`` (e.g. ``jax.ShapeDtypeStruct``) or to
    ``(shape, dtype)`` pairs; strings count 4 bytes (an index). Hidden states compress only ~1.2-1.4x, so this is
    close to the disk cost. Multiply by inferences per episode (max_steps / replan_steps) for an episode.
    """
    total = 0
    for value in record.values():
        if isinstance(value, str):
            total += 4
        elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (tuple, list)):
            total += nbytes(*value)
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            total += nbytes(value.shape, value.dtype)
        else:
            arr = np.asarray(value)
            total += nbytes(arr.shape, arr.dtype)
    return total


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
