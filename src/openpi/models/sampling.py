"""pi0's sampling program: the prefix pass, then Euler flow-matching steps of the action expert over the KV cache,
compiled with the captures a `CaptureSpec` asks for and an `Intervention`'s edits into one jitted function.

`sample_jit` is what `Pi0.sample_actions` (capture=None: the plain program) and `Pi0.infer_with_latents` call; the
model is passed in (a `family.Model`; this module does not import `pi0`), its token positions read from its
`layout.TokenLayout`. Time convention (upstream's): t = 1 is noise, t = 0 is data;
dt = -1/num_steps.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import einops
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from openpi.models import layer_edits
from openpi.models import model as _model
from openpi.models import suffix as _suffix
from openpi.models.capture import CaptureSpec
from openpi.models.layout import TokenLayout, layout_of
from openpi.models.taps import Tap
from openpi.shared import record_keys as rk

if TYPE_CHECKING:
    from openpi.models.family import Model


def make_attn_mask(input_mask: Bool[Array, "b n"], mask_ar: Bool[Array, "*b n"]) -> Bool[Array, "b n n"]:
    """Token i may attend token j iff cumsum(ar)[j] <= cumsum(ar)[i] and both are valid (big_vision's prefix-LM)."""
    mask_ar = jnp.broadcast_to(mask_ar, input_mask.shape)
    cumsum = jnp.cumsum(mask_ar, axis=1)
    attn_mask = cumsum[:, None, :] <= cumsum[:, :, None]
    valid = input_mask[:, None, :] * input_mask[:, :, None]
    return jnp.logical_and(attn_mask, valid)


def mean_weights(masks: Bool[Array, "b g t"]) -> Float[Array, "b g t"]:
    """Masked-mean weights per token group; a group with no valid token gets all-zero weights (its mean is 0)."""
    masks = masks.astype(jnp.float32)
    return masks / jnp.maximum(masks.sum(-1, keepdims=True), 1.0)


def check_x_t_sequence(x_t_sequence, num_steps: int, observation, model_or_config) -> None:
    if x_t_sequence is None:
        return
    layout = layout_of(model_or_config)
    want = (num_steps, observation.state.shape[0], layout.action_horizon, layout.action_dim)
    if tuple(x_t_sequence.shape) != want:
        raise ValueError(
            f"x_t_sequence has shape {tuple(x_t_sequence.shape)}, expected [num_steps, B, H, A] = {want}: pass the "
            "x_t fed to each denoising step (a run's captured x_t without its last entry, x_t[:num_steps])."
        )


def euler_times(num_steps: int) -> jax.Array:
    """The t of each step, accumulated in float32 exactly as the sampling loop does (1.0, 0.9, 0.79999995, ...)."""
    dt = -1.0 / num_steps
    t, times = jnp.float32(1.0), []
    for _ in range(num_steps):
        times.append(t)
        t = t + dt
    return jnp.stack(times)


def _prefix_taps(layout: TokenLayout, capture: CaptureSpec | None) -> tuple[Tap, ...]:
    if capture is None:
        return ()
    taps = []
    if capture.expert_0 == "full":
        taps.append(Tap(rk.EXPERT_0_HIDDEN_STATES, "residual", 0))
    elif capture.expert_0 == "pooled":
        taps.append(Tap(rk.EXPERT_0_SEGMENT_MEANS, "residual", 0, "pool"))
    if capture.text:
        taps.append(Tap(rk.TEXT_ONLY_HIDDEN_STATES, "residual", 0, (layout.text_start, layout.prefix_len)))
    taps += _ffn_taps(capture, 0)
    return tuple(taps)


def _ffn_taps(capture: CaptureSpec, expert: int) -> list[Tap]:
    if capture.ffn == "off":
        return []
    pooled = capture.ffn == "pooled"
    name = f"expert_{expert}_ffn_{'means' if pooled else 'hidden'}"
    return [Tap(name, "ffn_hidden", expert, "pool" if pooled else "full")]


# Per-denoising-step captures (`record_keys.STEP_KEYS`, the order `sample_actions_with_inference_steps` lists them)
# and the key groups of the expert-1 attention capture (`record_keys.ATTENTION_KEY_GROUPS`, each stored as
# `attention_to_<group>` [S', L', B, heads, Ts]; `attention_key_counts` [L', B, heads, Ts, 4] counts the keys each
# query may attend to, then those in each group): named once, in `openpi.shared.record_keys`.
STEP_KEYS = rk.STEP_KEYS
FFN_STEP_KEYS = rk.FFN_STEP_KEYS
ATTENTION_KEY_GROUPS = rk.ATTENTION_KEY_GROUPS
ATTENTION_COUNT_GROUPS = rk.ATTENTION_COUNT_GROUPS


def text_key_groups(model_or_config, prefix_mask: Bool[Array, "b p"]) -> Bool[Array, "b 3 s"]:
    """`ATTENTION_KEY_GROUPS` as masks over the joint keys [prefix | suffix] (the suffix belongs to none).

    A row with two valid text tokens or fewer has no content key (a blank prompt is BOS and "\\n"); with one, BOS is
    that token. The same rule as the analysis's `informative_text_mask`."""
    layout = layout_of(model_or_config)
    ts = layout.text_start
    n, total = prefix_mask.shape[1] - ts, prefix_mask.shape[1] + layout.suffix_len
    if n <= 0:  # no text in the prefix (an observation without a tokenized prompt)
        return jnp.zeros((prefix_mask.shape[0], len(ATTENTION_KEY_GROUPS), total), bool)
    text = prefix_mask[:, ts:]
    idx = jnp.arange(n)
    first = jnp.argmax(text, axis=-1)
    last = n - 1 - jnp.argmax(text[:, ::-1], axis=-1)
    bos = text & (idx == first[:, None])
    end = text & (idx == last[:, None]) & (last != first)[:, None]
    groups = jnp.stack([text, text & ~bos & ~end, bos], axis=1)
    return jnp.pad(groups, ((0, 0), (0, 0), (ts, total - ts - n)))


def _suffix_taps(capture: CaptureSpec | None) -> tuple[Tap, ...]:
    if capture is None:
        return ()
    taps = []
    if capture.expert_1 == "full":
        taps.append(Tap(rk.EXPERT_1_HIDDEN_STATES, "residual", 1))
    elif capture.expert_1 == "pooled":
        taps.append(Tap(rk.EXPERT_1_SEGMENT_MEANS, "residual", 1, "pool"))
    if capture.modulation:
        taps.append(Tap(rk.EXPERT_1_MODULATION, "modulation", 1))
    taps += _ffn_taps(capture, 1)
    return tuple(taps)


@functools.partial(jax.jit, static_argnames=("num_steps", "capture"))
def sample_jit(
    model: Model, rng, observation, *, num_steps: int, noise, capture: CaptureSpec | None, intervention=None,
    x_t_sequence=None,
):  # fmt: skip
    """The sampling loop shared by `sample_actions` (capture=None: the plain program) and `infer_with_latents`.

    An `intervention`'s expert-0 edits act in the prefix pass (and so on the KV cache every step reads); its expert-1
    edits act in each denoising step (selected by the step index). `x_t_sequence` replaces the carried x_t of each
    step (teacher forcing)."""
    cfg, layout = model.config, model.layout
    if capture is not None and capture.is_off:
        capture = None
    llm_params = {"params": model.params["PaliGemma"]["llm"]}
    obs = _model.preprocess_observation(None, observation, train=False)
    batch = obs.state.shape[0]
    dt = -1.0 / num_steps
    if noise is None:
        noise = jax.random.normal(rng, (batch, layout.action_horizon, layout.action_dim))

    # Prefix pass: once per inference; fills the KV cache.
    prefix_tokens, prefix_mask, prefix_ar = model.embed_prefix(obs)
    prefix_attn = make_attn_mask(prefix_mask, prefix_ar)
    # Positions count the valid tokens (a language knockout leaves the text out: prompt-length-free positions).
    counted = layer_edits.position_mask(intervention, layout, prefix_mask)
    positions = jnp.cumsum(counted, axis=1) - 1
    capture_dtype = None if capture is None else capture.dtype
    taps0 = _prefix_taps(layout, capture)
    pool0 = None
    if any(t.tokens == "pool" for t in taps0):
        pool0 = [mean_weights(model._token_groups(prefix_mask, None)), None]
    edits0 = None if intervention is None else layer_edits.for_prefix(intervention, layout, prefix_mask)
    prefix_out, kv_cache, prefix_caps = cfg.llm(taps0, capture_dtype).apply(
        llm_params, [prefix_tokens, None], positions, prefix_attn, pool_weights=pool0, edits=edits0
    )

    # Denoising loop: only the action expert runs, attending to the cached prefix.
    taps1 = _suffix_taps(capture)
    key_groups = None
    if capture is not None and capture.attention_to_text:
        key_groups = text_key_groups(layout, prefix_mask)
    pool1 = None
    if any(t.tokens == "pool" for t in taps1):
        # `suffix_segment_names`: suffix token 0 (pi0: the state; pi0.5: the first action), the mean of the rest.
        first_w = jnp.zeros((layout.suffix_len,)).at[0].set(1.0)
        rest_w = jnp.zeros((layout.suffix_len,)).at[1:].set(1.0 / (layout.suffix_len - 1))
        pool1 = [None, jnp.broadcast_to(jnp.stack([first_w, rest_w]), (batch, 2, layout.suffix_len))]
    llm1 = cfg.llm(taps1, capture_dtype)
    suffix_positions_base = jnp.sum(counted, axis=-1)[:, None]
    prefix_cols = einops.repeat(prefix_mask, "b p -> b s p", s=layout.suffix_len)

    def step(carry, xs):
        step_index, forced = xs
        x_t, t = carry
        if forced is not None:
            x_t = forced.astype(x_t.dtype)
        time = jnp.broadcast_to(t, (batch,))
        suffix_tokens, suffix_mask, suffix_ar = model.embed_suffix(obs, x_t, time)
        edits1 = None
        if intervention is not None:
            edits1 = layer_edits.for_denoise_step(intervention, layout, step_index, num_steps, suffix_mask)
        cond = model.adarms_cond(time)
        full_mask = jnp.concatenate([prefix_cols, make_attn_mask(suffix_mask, suffix_ar)], axis=-1)
        suffix_positions = suffix_positions_base + jnp.cumsum(suffix_mask, axis=-1) - 1
        (_, suffix_out), _, caps = llm1.apply(
            llm_params,
            [None, suffix_tokens],
            suffix_positions,
            full_mask,
            kv_cache=kv_cache,
            pool_weights=pool1,
            key_groups=key_groups,
            adarms_cond=[None, cond],
            edits=edits1,
        )
        v_t = _suffix.linear(model.params["action_out_proj"], suffix_out[:, -layout.action_horizon :])
        ys = None
        if capture is not None:
            ys = {"x_t": x_t, "v_t": v_t, "t": t, **caps}
            if capture.modulation:
                ys["adarms_cond"] = cond
        return (x_t + dt * v_t, t + dt), ys

    (x_0, _), ys = jax.lax.scan(step, (noise, jnp.array(1.0, jnp.float32)), (jnp.arange(num_steps), x_t_sequence))
    out = {"actions": x_0}
    if capture is None:
        return out

    layers = jnp.asarray(capture.layer_indices(layout.depth))
    steps = jnp.asarray(capture.step_indices(num_steps))
    for key, value in prefix_caps.items():
        out[key] = value[layers]
    for key in (rk.EXPERT_1_HIDDEN_STATES, rk.EXPERT_1_SEGMENT_MEANS, rk.EXPERT_1_MODULATION, *FFN_STEP_KEYS):
        if key in ys:
            out[key] = ys[key][steps][:, layers]
    if "adarms_cond" in ys:
        out[rk.ADARMS_COND] = ys["adarms_cond"][steps]
    if "attention_mass" in ys:
        mass = ys["attention_mass"][steps][:, layers]  # [S', L', B, heads, Ts, groups]
        for g in range(len(ATTENTION_KEY_GROUPS)):
            out[rk.ATTENTION_KEYS[g]] = mass[..., g]
        # Stored once: the mask is the same at every denoising step (a knockout restricted to denoise_steps: step 0's,
        # noted in the intervention's description).
        out[rk.ATTENTION_KEY_COUNTS] = ys["attention_key_counts"][0][layers]
    ts = layout.text_start
    out[rk.TEXT_MASK] = prefix_mask[:, ts : ts + layout.max_token_len]
    if capture.final_norm:  # the entry after the last layer: expert 0's output after its final norm (text window)
        out[rk.TEXT_ONLY_FINAL_NORM] = prefix_out[0][:, ts : ts + layout.max_token_len].astype(capture.dtype)
    # Which prefix segments (each camera, then the text) hold any valid token: a masked camera's tokens attend to
    # nothing valid, so their states are meaningless and analyses must leave them out.
    out[rk.SEGMENT_MASK] = model._token_groups(prefix_mask, None).any(axis=-1)
    out[rk.TOKENIZED_PROMPT] = obs.tokenized_prompt
    out[rk.DENOISE_TIMES] = ys["t"][steps]
    if capture.trajectory:
        out[rk.X_T] = jnp.concatenate([ys["x_t"], x_0[None]], axis=0)
        out[rk.V_T] = ys["v_t"]
    return out
