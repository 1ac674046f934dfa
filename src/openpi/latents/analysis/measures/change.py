"""Language-loss metrics for pi0 latents. Plain numpy on captured arrays.

Every function takes numpy arrays (bf16 / fp16 allowed: upcast to float32, reductions in float64 where stated),
is deterministic (seeded where random), and returns NaN, never a made-up number, where a quantity is undefined.
"Valid positions" are the positions a boolean mask marks True; for the text stream that is ``text_mask``, which covers
the BOS token, the prompt tokens and the trailing ``"\\n"`` token (pass a narrower mask to exclude them).

Axis convention (``keep_axes``): a metric is reduced over every axis except the ones listed in ``keep_axes`` (given
as axes of the positions shape, i.e. the input without its last, feature, axis; in input order). ``keep_axes=0`` on
``text_only_hidden_states`` [L, B, T, W] gives one number per layer; ``keep_axes=(0, 1)`` on
``expert_1_hidden_states`` [S, L, B, Ts, W] gives [S, L]. Masks broadcast against the positions shape with numpy's
right-aligned rules (``text_mask`` [B, T] against [L, B, T]).

Metrics (name: definition):

* Text reconstruction (:func:`text_reconstruction`, in :mod:`~openpi.latents.analysis.measures.text_decoding`):
  each valid text position's state h is decoded to ``argmax_v cos(h, E[v])`` over the token-embedding matrix E [V, W]
  (ties: lowest id; zero rows of E never win; a zero state decodes to -1, counted wrong). ``accuracy`` = fraction of
  valid positions decoded to their own token id; ``language_loss = 1 − accuracy``. At layer 0 the text stream is
  ``E[id]·sqrt(W)`` (cast to bf16), so the accuracy is 1 there by construction.
* Logit lens (:func:`logit_lens`): at the *same* position, ``z = E · RMSNorm_final(h)`` with Gemma's final norm
  ``x / sqrt(mean(x²) + eps) · (1 + scale)`` and the tied embedding; ``NLL = logsumexp(z) − z[id]`` (nats) and
  ``rank = #{v ≠ id : z[v] > z[id]}`` (0 = top). Not next-token prediction: pi0's prefix attention is bidirectional,
  so every prompt position already sees the next token and a next-token loss would be leaked.
* Prompt sensitivity (:func:`prompt_sensitivity`): same observation and noise, original vs counterfactual prompt;
  ``‖a − b‖_F / ‖a‖_F`` over the reduced axes (valid positions only). :func:`action_divergence`: mean over the chunk's
  H steps of the per-step L2 distance, and the max absolute difference.
* Task decodability (:func:`task_probe`, in :mod:`openpi.latents.analysis.measures.probe`): grouped cross-validated
  logistic-regression accuracy of the task id, with chance levels and a shuffled-label control.
* Drift (:func:`rollout_drift`): ``1 − cos(x_t, x_0)`` between rollout step t and the first rollout step of the same
  episode, over the flattened valid features; in [0, 2], 0 = same direction.
* Centred drift (:func:`centred_drift`): per position ``1 − cos(x_t − μ, x_0 − μ)`` with μ the collection mean of the
  layer, averaged over the positions valid at both steps (the headline drift; :func:`rollout_drift` is uncentred).
* Attention to language (:func:`attention_to_language`, in :mod:`openpi.latents.analysis.measures.attention`): attention
  probability mass from expert-1 queries onto a key group (:func:`attention_mass_onto_keys`; the text content keys by
  default, BOS separately), raw and normalised by the group's share of the keys the query may attend to (uniform
  attention = 1), per layer, per head, per denoising step (action queries) and for pi0's state query once.
* Success relation (:func:`split_by_success`, :func:`bootstrap_ci`): per-episode values split by ``success`` with
  percentile-bootstrap intervals for each side and their difference.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from openpi.latents.analysis.measures.arrays import norm_axes, scalar_or

# --------------------------------------------------------------------------------------------------------------------
# 2. Prompt sensitivity


def prompt_sensitivity(original, counterfactual, *, mask=None, keep_axes=0) -> float | np.ndarray:
    """Relative change of a stream under a counterfactual prompt: ``‖a − b‖_F / ‖a‖_F``.

    ``a`` = ``original`` and ``b`` = ``counterfactual`` have the same shape [..., W] (the last axis is features). The
    Frobenius norms run over every axis not in ``keep_axes`` (default 0: one number per layer for [L, ...] streams;
    ``(0, 1)`` for [S, L, ...]), over the valid positions of ``mask`` only (bool broadcast against ``shape[:-1]``).
    Computed in float64. 0 = unchanged; 1 = the change is as large as the state itself. NaN where ``‖a‖ = 0``.

    When comparing the text window under two different prompts, the positions hold different tokens: use a mask valid
    in both, and read the number as "how different", not "how much language was used". Same observation and noise
    are assumed; otherwise this measures the noise too.
    """
    a, b = np.asarray(original), np.asarray(counterfactual)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    keep = norm_axes(keep_axes, a.ndim - 1)
    m = None if mask is None else np.broadcast_to(np.asarray(mask).astype(bool)[..., None], a.shape)
    dst = tuple(range(len(keep)))
    am, bm = np.moveaxis(a, keep, dst), np.moveaxis(b, keep, dst)
    mm = None if m is None else np.moveaxis(m, keep, dst)
    kshape = am.shape[: len(keep)]
    out = np.full(kshape, np.nan)
    for idx in np.ndindex(kshape):
        x, y = am[idx].astype(np.float64), bm[idx].astype(np.float64)
        if mm is not None:
            x, y = np.where(mm[idx], x, 0.0), np.where(mm[idx], y, 0.0)
        den = np.sqrt(np.sum(x * x))
        if den > 0:
            out[idx] = np.sqrt(np.sum((x - y) ** 2)) / den
    return scalar_or(out)


@dataclasses.dataclass(frozen=True)
class ActionDivergence:
    """Result of :func:`action_divergence`; scalars for one chunk [H, D], arrays [...] for batched [..., H, D].

    Attributes:
        mean_l2: mean over the H chunk steps of ``‖a_h − b_h‖_2`` (over the D action dims).
        max_abs: max over H and D of ``|a − b|``.
    """

    mean_l2: float | np.ndarray
    max_abs: float | np.ndarray


def action_divergence(actions_a, actions_b) -> ActionDivergence:
    """Divergence between two action chunks [..., H, D] (float64).

    Compare the actions the robot would execute (after the output transforms, e.g. LIBERO's 7 dims), not the padded
    32-dim model output, whose padding dims are meaningless.
    """
    a, b = np.asarray(actions_a).astype(np.float64), np.asarray(actions_b).astype(np.float64)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"need equal shapes [..., H, D]; got {a.shape} vs {b.shape}")
    d = a - b
    return ActionDivergence(scalar_or(np.sqrt((d * d).sum(-1)).mean(-1)), scalar_or(np.abs(d).max((-2, -1))))


# --------------------------------------------------------------------------------------------------------------------
# 4. Drift over the rollout


def rollout_drift(states, *, mask=None, keep_axes=()) -> np.ndarray:
    """Per rollout step, ``1 − cos(x_t, x_0)`` against the first rollout step of the same episode.

    ``states`` [steps, ..., W] stacks one episode's captures along axis 0 (e.g. [steps, L, B, T, W]). The cosine runs
    over the flattened features of the valid positions (``mask`` broadcast against ``states.shape[:-1]``; a position
    counts when valid at both step t and step 0) of everything except axis 0 and ``keep_axes`` (axes of ``states``,
    e.g. ``keep_axes=1`` for [steps, L, ...] → [steps, L]). Float64; clipped to [0, 2]; exactly 0 when the compared
    values are identical; NaN where either side has zero norm. Returns [steps, *kept] (row 0 is 0).
    """
    x = np.asarray(states)
    keep = norm_axes(keep_axes, x.ndim - 1)
    if 0 in keep:
        raise ValueError("axis 0 (the rollout step) is always kept; list the other axes to keep")
    m = None if mask is None else np.broadcast_to(np.asarray(mask).astype(bool)[..., None], x.shape)
    dst = tuple(range(1, len(keep) + 1))
    xm = np.moveaxis(x, keep, dst)
    mm = None if m is None else np.moveaxis(m, keep, dst)
    kshape = xm.shape[1 : len(keep) + 1]
    out = np.full((x.shape[0],) + kshape, np.nan)
    for idx in np.ndindex(kshape):
        a0 = xm[(0,) + idx].astype(np.float64)
        for t in range(x.shape[0]):
            a, b = a0, xm[(t,) + idx].astype(np.float64)
            if mm is not None:
                both = mm[(0,) + idx] & mm[(t,) + idx]
                a, b = np.where(both, a, 0.0), np.where(both, b, 0.0)
            if np.array_equal(a, b) and np.any(a):
                out[(t,) + idx] = 0.0
                continue
            den = np.sqrt(np.sum(a * a) * np.sum(b * b))
            if den > 0:
                out[(t,) + idx] = np.clip(1.0 - np.sum(a * b) / den, 0.0, 2.0)
    return out


def centred_drift(states, mean, *, mask=None) -> np.ndarray:
    """Per rollout step, the mean over positions of ``1 − cos(x_t,p − μ, x_0,p − μ)`` against the first step.

    ``states`` [steps, ..., W] (one episode; every axis between the first and the last is a position: batch, token,
    segment), ``mean`` μ [W] (the collection mean of the layer over every valid position, rollout step and episode).
    Centring removes what every state shares: Gemma's residual stream carries a few massive shared directions, and
    an uncentred cosine over all tokens flattened (:func:`rollout_drift`) is dominated by them, so a large change
    orthogonal to them reads as almost none. Comparing each position with itself (then averaging over the positions
    valid at both steps, ``mask`` broadcast against ``states.shape[:-1]``) keeps one token's change from being
    averaged against another's. Float64; each cosine clipped to [0, 2]; a position with a zero centred vector at
    either step does not count; NaN where no position counts. Returns [steps] (row 0 is 0).
    """
    x = np.asarray(states).astype(np.float64) - np.asarray(mean, np.float64)
    n = x.shape[0]
    flat = x.reshape(n, -1, x.shape[-1])
    m = np.ones(flat.shape[:2], bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape[:-1])
    m = m.reshape(n, -1)
    a0 = flat[0]
    n0 = np.linalg.norm(a0, axis=-1)
    out = np.full(n, np.nan)
    for t in range(n):
        nt = np.linalg.norm(flat[t], axis=-1)
        ok = m[0] & m[t] & (n0 > 0) & (nt > 0)
        if ok.any():
            cos = np.einsum("pw,pw->p", flat[t][ok], a0[ok]) / (nt[ok] * n0[ok])
            same = np.all(flat[t][ok] == a0[ok], axis=-1)
            out[t] = float(np.mean(np.where(same, 0.0, np.clip(1.0 - cos, 0.0, 2.0))))
    return out


# --------------------------------------------------------------------------------------------------------------------
# 5. Attention to language


def attention_mass_onto_keys(probs, key_mask):
    """Attention mass each query puts on the selected keys: ``sum_s probs[..., t, s] · key_mask[..., s]`` → [..., T].

    ``probs`` [..., T, S] are softmax probabilities over S keys; ``key_mask`` [..., S] (bool) broadcasts against
    ``probs`` with the query axis inserted. The result lies in [0, 1] when each row of ``probs`` sums to 1. Uses only
    array methods, so it works on jax arrays inside jit as well (this is the definition the capture uses). Inputs
    narrower than float32 are upcast to float32.
    """
    if np.dtype(probs.dtype).itemsize < 4:
        probs = probs.astype(np.float32)
    return (probs * key_mask[..., None, :].astype(probs.dtype)).sum(axis=-1)
