"""The record keys: every key one recorded inference (one rollout step) can hold, and what it means, defined once.

The model names what it captures with these (`openpi.models.sampling`), the store describes how it keeps them
(`openpi.latents.schema`: axes, dtype, stream; byte sizes) and the analysis finds its streams by them
(`openpi.latents.analysis.data.streams`). Pure stdlib, so the model, the store and the analysis all import it: the model
imports nothing from `openpi.latents`, and reading a store imports no model code.

A counterfactual rerun of the same step with another prompt stores its values under ``cf_<key>`` (:data:`CF_PREFIX`),
its teacher-forced twin (fed the baseline's x_t at every denoising step) under ``cf_tf_<key>``; both have the axes
and dtype of ``<key>`` and may come and go from one rollout step to the next.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

CF_PREFIX = "cf_"
CF_TF_PREFIX = "cf_tf_"
# "capture": the hidden-state dtype the CaptureSpec asks for (bfloat16, float16 or float32).
CAPTURE_DTYPE = "capture"
STRING_DTYPE = "string"

Stream = Literal[
    "rollout",
    "policy",
    "env",
    "model",
    "expert_0",
    "expert_1",
    "text",
    "attention_to_text",
    "trajectory",
    "modulation",
    "ffn",
]

# The keys the model captures (`Pi0.infer_with_latents`), by name.
EXPERT_0_HIDDEN_STATES = "expert_0_hidden_states"
EXPERT_0_SEGMENT_MEANS = "expert_0_segment_means"
TEXT_ONLY_HIDDEN_STATES = "text_only_hidden_states"
TEXT_ONLY_FINAL_NORM = "text_only_final_norm"
EXPERT_1_HIDDEN_STATES = "expert_1_hidden_states"
EXPERT_1_SEGMENT_MEANS = "expert_1_segment_means"
EXPERT_1_MODULATION = "expert_1_modulation"
ADARMS_COND = "adarms_cond"
ATTENTION_KEY_COUNTS = "attention_key_counts"
TEXT_MASK = "text_mask"
TOKENIZED_PROMPT = "tokenized_prompt"
SEGMENT_MASK = "segment_mask"
DENOISE_TIMES = "denoise_times"
EXPERT_0_FFN_MEANS = "expert_0_ffn_means"
EXPERT_0_FFN_HIDDEN = "expert_0_ffn_hidden"
EXPERT_1_FFN_MEANS = "expert_1_ffn_means"
EXPERT_1_FFN_HIDDEN = "expert_1_ffn_hidden"
X_T = "x_t"
V_T = "v_t"
# The key groups of the expert-1 attention capture (`CaptureSpec.attention_to_text`): every valid text key; the text
# *content* keys (the valid text keys without the first and the last: BOS and the "\n" pi0's tokenizer appends, the
# same for every prompt; on pi0.5 the last is the final token of the constant "Action: "; a prompt truncated at
# max_token_len loses its "\n", and then its last kept token is the one left out); BOS (the first valid text key).
# Each group g is stored as ``attention_to_<g>``; ``attention_key_counts`` counts the keys each query may attend to
# ("visible"), then those in each group.
ATTENTION_KEY_GROUPS = ("text", "text_content", "bos")
ATTENTION_KEYS = tuple(f"attention_to_{g}" for g in ATTENTION_KEY_GROUPS)
ATTENTION_TO_TEXT = ATTENTION_KEYS[0]  # the attention capture the analysis reads first (every store with one has it)
ATTENTION_COUNT_GROUPS = ("visible", *ATTENTION_KEY_GROUPS)
# The per-denoising-step captures, in the order the sampling loop lists them.
FFN_STEP_KEYS = (EXPERT_1_FFN_MEANS, EXPERT_1_FFN_HIDDEN)
STEP_KEYS = (
    EXPERT_1_HIDDEN_STATES,
    EXPERT_1_SEGMENT_MEANS,
    *ATTENTION_KEYS,
    EXPERT_1_MODULATION,
    ADARMS_COND,
    *FFN_STEP_KEYS,
)


@dataclasses.dataclass(frozen=True)
class RecordKey:
    """One key of a latent record.

    ``stream``: the CaptureSpec stream that produces it (``expert_0``, ``expert_1``, ``text``,
    ``attention_to_text``, ``trajectory``, ``modulation``); ``model`` for model outputs present with any capture;
    ``policy`` / ``env`` / ``rollout`` for what the policy, the simulator and the collection loop add. ``optional``: a
    record may lack the key (it depends on the CaptureSpec or a collection argument). ``dims`` None: the store names
    the axes ``dim_0, dim_1, ...`` (format version 1 gave this key no axis names; kept so stores stay byte-identical).
    ``meaning``: what the value is.
    """

    name: str
    dims: tuple[str, ...] | None
    dtype: str  # numpy dtype name, CAPTURE_DTYPE or STRING_DTYPE
    stream: Stream
    optional: bool
    meaning: str = ""


def _keys(*keys: RecordKey) -> dict[str, RecordKey]:
    return {k.name: k for k in keys}


_HIDDEN = ("layer", "batch", "token", "width")
_ATTENTION = ("denoise_step", "layer", "batch", "head", "query")
_SEGMENTS = ("layer", "batch", "segment", "width")
_RESIDUAL = "the residual stream entering each captured layer"
RECORD_KEYS: dict[str, RecordKey] = _keys(
    RecordKey("t", (), "int64", "rollout", False, "env timestep of the inference (after the wait steps)"),
    RecordKey("prompt", (), STRING_DTYPE, "rollout", False, "the prompt the model got"),
    RecordKey("received_time", (), "float64", "rollout", True, "the server's: when the request arrived (unix s)"),
    RecordKey("sent_prompt", (), STRING_DTYPE, "rollout", True, "the server's: the request's prompt, if replaced"),
    RecordKey(
        "executed_actions", ("executed", "action_dim"), "float32", "rollout", False, "the chunk's actions queued"
    ),
    RecordKey("actions", ("horizon", "action_dim"), "float32", "policy", False, "the chunk after output transforms"),
    RecordKey(
        "model_actions", ("horizon", "model_action_dim"), "float32", "policy", False, "the normalised model output"
    ),
    RecordKey("noise", None, "float32", "policy", False, "the flow-matching noise the inference started from"),
    RecordKey("state", ("state_dim",), "float32", "env", False, "the robot state of the observation"),
    RecordKey("image", ("height", "width", "channel"), "uint8", "env", True, "the preprocessed agent-view image"),
    RecordKey("wrist_image", ("height", "width", "channel"), "uint8", "env", True, "the preprocessed wrist image"),
    RecordKey(TEXT_MASK, ("batch", "token"), "bool", "model", False, "which text-window positions are valid"),
    RecordKey(TOKENIZED_PROMPT, ("batch", "token"), "int32", "model", False, "the prompt's token ids"),
    RecordKey(SEGMENT_MASK, None, "bool", "model", False, "which prefix segments (cameras, text) hold a valid token"),
    RecordKey(DENOISE_TIMES, ("denoise_step",), "float32", "model", False, "t of each captured denoising step"),
    RecordKey(EXPERT_0_HIDDEN_STATES, _HIDDEN, CAPTURE_DTYPE, "expert_0", True, f"expert 0: {_RESIDUAL}, every token"),
    # pooled captures are float32 whatever the capture dtype (small; bf16 floors relative changes at ~1e-3)
    RecordKey(EXPERT_0_SEGMENT_MEANS, _SEGMENTS, "float32", "expert_0", True, "expert 0: mean per prefix segment"),
    RecordKey(TEXT_ONLY_HIDDEN_STATES, _HIDDEN, CAPTURE_DTYPE, "text", True, f"expert 0: {_RESIDUAL}, text window"),
    RecordKey(
        TEXT_ONLY_FINAL_NORM,
        ("batch", "token", "width"),
        CAPTURE_DTYPE,
        "text",
        True,
        "expert 0's output after its final norm at the text positions (after the last layer; CaptureSpec.final_norm)",
    ),
    RecordKey(
        EXPERT_1_HIDDEN_STATES, ("denoise_step", *_HIDDEN), CAPTURE_DTYPE, "expert_1", True, f"expert 1: {_RESIDUAL}"
    ),
    RecordKey(
        EXPERT_1_SEGMENT_MEANS,
        ("denoise_step", *_SEGMENTS),
        "float32",
        "expert_1",
        True,
        "expert 1: the state token and the mean of the action tokens (pi0), per denoising step",
    ),
    # stores written before the content / BOS keys existed hold attention_to_text only
    *(
        RecordKey(k, _ATTENTION, "float32", "attention_to_text", True, f"each expert-1 query's attention mass on {g}")
        for k, g in zip(ATTENTION_KEYS, ("every valid text key", "the text content keys", "BOS"), strict=True)
    ),
    # the same at every denoising step, so stored once
    RecordKey(
        ATTENTION_KEY_COUNTS,
        ("layer", "batch", "head", "query", "key_group"),
        "float32",
        "attention_to_text",
        True,
        "keys each query may attend to (mask after any knockout), then of them in each group (ATTENTION_COUNT_GROUPS)",
    ),
    RecordKey(
        EXPERT_1_MODULATION,
        ("denoise_step", "layer", "batch", "norm", "component", "width"),
        CAPTURE_DTYPE,
        "modulation",
        True,
        "pi0.5: adaptive-norm (scale, shift, gate) of the pre-attention / pre-FFN norms",
    ),
    RecordKey(
        ADARMS_COND, ("denoise_step", "batch", "width"), CAPTURE_DTYPE, "modulation", True, "pi0.5: the time condition"
    ),
    # CaptureSpec.ffn: the FFN hidden activations (gated product before the down projection), pooled or full.
    RecordKey(
        EXPERT_0_FFN_MEANS,
        ("layer", "batch", "segment", "neuron"),
        "float32",
        "ffn",
        True,
        "expert 0: FFN activations, mean per segment",
    ),
    RecordKey(
        EXPERT_0_FFN_HIDDEN,
        ("layer", "batch", "token", "neuron"),
        CAPTURE_DTYPE,
        "ffn",
        True,
        "expert 0: FFN activations, every token",
    ),
    RecordKey(
        EXPERT_1_FFN_MEANS,
        ("denoise_step", "layer", "batch", "segment", "neuron"),
        "float32",
        "ffn",
        True,
        "expert 1: FFN activations, mean per segment, per denoising step",
    ),
    RecordKey(
        EXPERT_1_FFN_HIDDEN,
        ("denoise_step", "layer", "batch", "token", "neuron"),
        CAPTURE_DTYPE,
        "ffn",
        True,
        "expert 1: FFN activations, every token, per denoising step",
    ),
    RecordKey(
        X_T,
        ("denoise_point", "batch", "horizon", "action_dim"),
        "float32",
        "trajectory",
        True,
        "the denoising trajectory: x_t entering each step, then the final x_0",
    ),
    RecordKey(
        V_T,
        ("denoise_step", "batch", "horizon", "action_dim"),
        "float32",
        "trajectory",
        True,
        "the velocity of each denoising step",
    ),
)


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
    """The entry of ``key`` (a ``cf_`` key has its base key's entry), or None for a key this table lacks."""
    return RECORD_KEYS.get(base_key(key))


def dims_for(key: str, ndim: int) -> tuple[str, ...]:
    """Per-step axis names of ``key`` (without the leading "step" axis); generic names for unknown keys."""
    entry = record_key(key)
    if entry is not None and entry.dims is not None and len(entry.dims) == ndim:
        return entry.dims
    return tuple(f"dim_{i}" for i in range(ndim))
