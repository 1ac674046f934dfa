"""Language-loss metrics for pi0 latents (design.md section 6). Plain numpy on captured arrays.

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

* Text reconstruction (:func:`text_reconstruction`): each valid text position's state h is decoded to
  ``argmax_v cos(h, E[v])`` over the token-embedding matrix E [V, W] (ties: lowest id; zero rows of E never win; a
  zero state decodes to -1, counted wrong). ``accuracy`` = fraction of valid positions decoded to their own token id;
  ``language_loss = 1 − accuracy``. At layer 0 the text stream is ``E[id]·sqrt(W)`` (cast to bf16), so the accuracy is
  1 there by construction.
* Logit lens (:func:`logit_lens`): at the *same* position, ``z = E · RMSNorm_final(h)`` with Gemma's final norm
  ``x / sqrt(mean(x²) + eps) · (1 + scale)`` and the tied embedding; ``NLL = logsumexp(z) − z[id]`` (nats) and
  ``rank = #{v ≠ id : z[v] > z[id]}`` (0 = top). Not next-token prediction: pi0's prefix attention is bidirectional,
  so every prompt position already sees the next token and a next-token loss would be leaked.
* Prompt sensitivity (:func:`prompt_sensitivity`): same observation and noise, original vs counterfactual prompt;
  ``‖a − b‖_F / ‖a‖_F`` over the reduced axes (valid positions only). :func:`action_divergence`: mean over the chunk's
  H steps of the per-step L2 distance, and the max absolute difference.
* Task decodability (:func:`task_probe`, in :mod:`openpi.latents.stats`): grouped cross-validated logistic-regression
  accuracy of the task id, with chance levels and a shuffled-label control.
* Drift (:func:`rollout_drift`): ``1 − cos(x_t, x_0)`` between rollout step t and the first rollout step of the same
  episode, over the flattened valid features; in [0, 2], 0 = same direction.
* Attention to language (:func:`attention_to_language`): attention probability mass from expert-1 queries onto the
  valid text keys (:func:`attention_mass_onto_keys`), averaged over batch, heads and queries, per denoising step and
  layer, and separately for the state-token query and the action-token queries.
* Success relation (:func:`split_by_success`, :func:`bootstrap_ci`): per-episode values split by ``success`` with
  percentile-bootstrap intervals for each side and their difference.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from openpi.latents.stats import BootstrapCI, ProbeResult, SuccessSplit, bootstrap_ci, split_by_success, task_probe

__all__ = [
    "ActionDivergence",
    "AttentionToLanguage",
    "BootstrapCI",
    "LogitLens",
    "ProbeResult",
    "SuccessSplit",
    "TextReconstruction",
    "action_divergence",
    "attention_mass_onto_keys",
    "attention_to_language",
    "bootstrap_ci",
    "final_rms_norm",
    "logit_lens",
    "masked_mean",
    "prompt_sensitivity",
    "rollout_drift",
    "split_by_success",
    "task_probe",
    "text_positions",
    "text_reconstruction",
]

_ROW_BLOCK = 2048  # positions per matmul block


# --------------------------------------------------------------------------------------------------------------------
# Small utilities


def text_positions(text_mask) -> tuple[np.ndarray, ...]:
    """Index arrays of the valid text positions: ``np.nonzero(text_mask)``.

    For ``text_mask`` [B, T] this is ``(b_idx, t_idx)``, so ``text_only_hidden_states[:, b_idx, t_idx]`` gathers the
    valid text states into [L, n_valid, W] and ``tokenized_prompt[b_idx, t_idx]`` their ids.
    """
    return np.nonzero(np.asarray(text_mask).astype(bool))


def masked_mean(x, mask) -> np.ndarray:
    """Mean of ``x`` [..., T, W] over the valid positions of ``mask`` (broadcast against [..., T]) → [..., W] float32.

    NaN where a row has no valid position. Useful to pool text states into one probe feature vector per inference.
    """
    x = np.asarray(x).astype(np.float32)
    m = np.broadcast_to(np.asarray(mask).astype(bool), x.shape[:-1])
    count = m.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(m[..., None], x, 0).sum(-2, dtype=np.float64) / count).astype(np.float32)


def _norm_axes(keep_axes, ndim: int) -> tuple[int, ...]:
    if keep_axes is None:
        return ()
    axes = (keep_axes,) if isinstance(keep_axes, int | np.integer) else tuple(keep_axes)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"keep axis {a} out of range for {ndim} position axes")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"repeated keep axis in {keep_axes}")
    return tuple(sorted(out))


def _scalar_or(x: np.ndarray):
    return x.item() if x.ndim == 0 else x


def _reduce_valid(values: np.ndarray, valid: np.ndarray, keep: tuple[int, ...], fn) -> float | np.ndarray:
    """``fn`` of the valid entries of ``values`` for each index of the kept axes (NaN where none is valid)."""
    dst = tuple(range(len(keep)))
    v, m = np.moveaxis(values, keep, dst), np.moveaxis(valid, keep, dst)
    kshape = v.shape[: len(keep)]
    v, m = v.reshape(kshape + (-1,)), m.reshape(kshape + (-1,))
    out = np.full(kshape, np.nan)
    for idx in np.ndindex(kshape):
        sel = v[idx][m[idx]]
        if sel.size:
            out[idx] = fn(sel)
    return _scalar_or(out)


def _valid_rows(hidden, token_ids, mask, vocab: int):
    """Flatten to the valid positions: (rows [N, W] float32, ids [N] int64, valid [P] bool) with P = hidden[:-1]."""
    h = np.asarray(hidden)
    pshape = h.shape[:-1]
    ids = np.broadcast_to(np.asarray(token_ids), pshape)
    valid = np.ones(pshape, bool) if mask is None else np.broadcast_to(np.asarray(mask).astype(bool), pshape)
    flat = valid.reshape(-1)
    rows = h.reshape(-1, h.shape[-1])[flat].astype(np.float32)
    ids_v = ids.reshape(-1)[flat].astype(np.int64)
    if ids_v.size and (ids_v.min() < 0 or ids_v.max() >= vocab):
        raise ValueError(f"token ids at valid positions must lie in [0, {vocab})")
    return rows, ids_v, np.ascontiguousarray(valid)


def _scatter(values: np.ndarray, valid: np.ndarray, fill) -> np.ndarray:
    out = np.full(valid.shape, fill, dtype=values.dtype)
    out[valid] = values
    return out


# --------------------------------------------------------------------------------------------------------------------
# 1. Text reconstruction and logit lens


@dataclasses.dataclass(frozen=True)
class TextReconstruction:
    """Result of :func:`text_reconstruction`. Summary fields are floats, or arrays shaped like the kept axes.

    Attributes:
        accuracy: fraction of valid positions whose nearest-by-cosine token is the true token (NaN: no valid position).
        language_loss: ``1 - accuracy``.
        n_valid: number of valid positions behind each accuracy.
        predicted_ids: [..., T] int64 nearest token id; -1 at invalid positions and for all-zero states.
        true_cosine: [..., T] float32 cosine between the state and its true token's embedding; NaN at invalid positions.
        correct: [..., T] bool, ``predicted_ids == token_ids`` at valid positions, False elsewhere.
        valid: [..., T] bool, the mask broadcast to the positions shape.
    """

    accuracy: float | np.ndarray
    language_loss: float | np.ndarray
    n_valid: int | np.ndarray
    predicted_ids: np.ndarray
    true_cosine: np.ndarray
    correct: np.ndarray
    valid: np.ndarray


def text_reconstruction(hidden, token_ids, mask, embedding, *, chunk: int = 8192, keep_axes=None) -> TextReconstruction:
    """Decode each valid position's state to its nearest token embedding by cosine similarity.

    ``pred = argmax_v  h·E[v] / (‖h‖ ‖E[v]‖)``; accuracy = mean over valid positions of ``pred == id``.

    Args:
        hidden: [..., T, W] states (e.g. ``text_only_hidden_states`` [L, B, T, W]).
        token_ids: ids broadcastable to [..., T] (e.g. ``tokenized_prompt`` [B, T]).
        mask: bool broadcastable to [..., T] (e.g. ``text_mask``), or None for all positions.
        embedding: [V, W] token embedding (``PaliGemma/llm/embedder/input_embedding``); any array that slices to numpy
            (a memmap works). Read ``chunk`` rows at a time, upcast to float32. For repeated calls pass it as float32
            once: converting the bf16 [257152, 2048] table costs seconds per call.
        chunk: vocab rows per block. Peak extra memory is about ``chunk·W·4`` + ``2048·chunk·4`` bytes.
        keep_axes: position axes to keep in the summaries (see the module docstring); None = one number.

    Cost is ~2·N·V·W flops for N valid positions: pass many positions per call (all layers and steps at once) rather
    than one call per layer, as the embedding is re-read on every call.
    """
    vocab, width = embedding.shape
    rows, ids, valid = _valid_rows(hidden, token_ids, mask, vocab)
    if rows.shape[-1] != width:
        raise ValueError(f"hidden width {rows.shape[-1]} != embedding width {width}")
    hnorm = np.linalg.norm(rows, axis=-1)
    unit = rows / np.where(hnorm > 0, hnorm, 1)[:, None]
    best = np.full(len(rows), -np.inf, np.float32)
    arg = np.full(len(rows), -1, np.int64)
    for start in range(0, vocab, chunk):
        e = np.asarray(embedding[start : start + chunk]).astype(np.float32, copy=False)
        enorm = np.sqrt(np.einsum("vw,vw->v", e, e))
        inv = (1 / np.where(enorm > 0, enorm, 1)).astype(np.float32)
        for r in range(0, len(rows), _ROW_BLOCK):
            s = unit[r : r + _ROW_BLOCK] @ e.T
            s *= inv  # cosine
            s[:, enorm == 0] = -np.inf
            loc = s.argmax(-1)
            val = s[np.arange(len(s)), loc]
            upd = val > best[r : r + _ROW_BLOCK]  # strict: the lowest id wins ties
            best[r : r + _ROW_BLOCK][upd] = val[upd]
            arg[r : r + _ROW_BLOCK][upd] = loc[upd] + start
    arg[hnorm == 0] = -1
    true_e = np.asarray(embedding[ids] if ids.size else np.zeros((0, width))).astype(np.float32)
    tnorm = np.linalg.norm(true_e, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tcos = (np.einsum("nw,nw->n", unit, true_e) / tnorm).astype(np.float32)
    tcos[(hnorm == 0) | (tnorm == 0)] = np.nan

    pred = _scatter(arg, valid, -1)
    correct = _scatter(arg == ids, valid, False)
    keep = _norm_axes(keep_axes, valid.ndim)
    acc = _reduce_valid(correct, valid, keep, np.mean)
    n_valid = _reduce_valid(np.ones(valid.shape), valid, keep, np.sum)
    n_valid = int(np.nan_to_num(n_valid)) if np.ndim(n_valid) == 0 else np.nan_to_num(n_valid).astype(np.int64)
    return TextReconstruction(acc, 1 - acc, n_valid, pred, _scatter(tcos, valid, np.float32(np.nan)), correct, valid)


@dataclasses.dataclass(frozen=True)
class LogitLens:
    """Result of :func:`logit_lens`. Summary fields are floats, or arrays shaped like the kept axes (NaN: no valid).

    Attributes:
        mean_nll: mean over valid positions of the true token's negative log-probability (nats).
        mean_rank, median_rank: mean / median of the true token's rank (0 = highest logit).
        top1: fraction of valid positions with rank 0.
        n_valid: number of valid positions.
        nll: [..., T] float64 per-position NLL, NaN at invalid positions.
        rank: [..., T] int64 per-position rank, -1 at invalid positions.
        valid: [..., T] bool.
    """

    mean_nll: float | np.ndarray
    mean_rank: float | np.ndarray
    median_rank: float | np.ndarray
    top1: float | np.ndarray
    n_valid: int | np.ndarray
    nll: np.ndarray
    rank: np.ndarray
    valid: np.ndarray


def final_rms_norm(x, scale, *, eps: float = 1e-6) -> np.ndarray:
    """Gemma's RMSNorm in float32: ``x / sqrt(mean(x², -1) + eps) · (1 + scale)``."""
    x = np.asarray(x).astype(np.float32)
    var = np.mean(np.square(x), axis=-1, keepdims=True)
    return x / np.sqrt(var + np.float32(eps)) * (1 + np.asarray(scale).astype(np.float32))


def logit_lens(
    hidden, token_ids, mask, embedding, final_norm_scale, *, eps: float = 1e-6, chunk: int = 8192, keep_axes=None
) -> LogitLens:
    """Same-position logit lens: how well does each valid position's state predict its *own* token?

    ``z = E · RMSNorm(h; final_norm_scale)`` (tied embedding, float32), ``nll = logsumexp(z) − z[id]`` computed with a
    streaming log-sum-exp over vocab chunks (float64 accumulation; clipped at 0 against float32 rounding),
    ``rank = #{v ≠ id : z[v] > z[id]}`` (ties count in the token's favour). ``final_norm_scale`` is expert 0's
    ``PaliGemma/llm/final_norm/scale`` [W].

    This is not next-token prediction: the pi0 prefix is bidirectional (every prompt token attends to every other),
    so a next-token loss on the prompt would be read off the answer; the same-position lens asks whether the token's
    identity is still linearly readable through the output head. The final norm is meant for the last layer's output;
    applying it to earlier layers is the usual logit-lens approximation.

    Args and memory: as :func:`text_reconstruction`.
    """
    vocab, width = embedding.shape
    rows, ids, valid = _valid_rows(hidden, token_ids, mask, vocab)
    if rows.shape[-1] != width:
        raise ValueError(f"hidden width {rows.shape[-1]} != embedding width {width}")
    normed = final_rms_norm(rows, final_norm_scale, eps=eps)
    true_e = np.asarray(embedding[ids] if ids.size else np.zeros((0, width))).astype(np.float32)
    true_z = np.einsum("nw,nw->n", normed, true_e)
    m = np.full(len(rows), -np.inf)
    s = np.zeros(len(rows))
    rank = np.zeros(len(rows), np.int64)
    for start in range(0, vocab, chunk):
        e = np.asarray(embedding[start : start + chunk]).astype(np.float32, copy=False)
        for r in range(0, len(rows), _ROW_BLOCK):
            blk = slice(r, r + _ROW_BLOCK)
            z = normed[blk] @ e.T
            new_m = np.maximum(m[blk], z.max(-1))
            s[blk] = s[blk] * np.exp(m[blk] - new_m) + np.exp(z - new_m[:, None].astype(np.float32)).sum(
                -1, dtype=np.float64
            )
            m[blk] = new_m
            greater = z > true_z[blk, None]
            local = ids[blk] - start
            inside = np.nonzero((local >= 0) & (local < len(e)))[0]
            greater[inside, local[inside]] = False  # the true token is not ranked against itself
            rank[blk] += greater.sum(-1)
    nll = np.maximum(m + np.log(s) - true_z, 0.0)  # >= 0 up to float32 rounding of z[id]
    keep = _norm_axes(keep_axes, valid.ndim)
    nll_full = _scatter(nll, valid, np.nan)
    rank_full = _scatter(rank, valid, -1)
    n_valid = _reduce_valid(np.ones(valid.shape), valid, keep, np.sum)
    n_valid = int(np.nan_to_num(n_valid)) if np.ndim(n_valid) == 0 else np.nan_to_num(n_valid).astype(np.int64)
    return LogitLens(
        mean_nll=_reduce_valid(nll_full, valid, keep, np.mean),
        mean_rank=_reduce_valid(rank_full, valid, keep, np.mean),
        median_rank=_reduce_valid(rank_full, valid, keep, np.median),
        top1=_reduce_valid(rank_full == 0, valid, keep, np.mean),
        n_valid=n_valid,
        nll=nll_full,
        rank=rank_full,
        valid=valid,
    )


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
    keep = _norm_axes(keep_axes, a.ndim - 1)
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
    return _scalar_or(out)


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
    return ActionDivergence(_scalar_or(np.sqrt((d * d).sum(-1)).mean(-1)), _scalar_or(np.abs(d).max((-2, -1))))


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
    keep = _norm_axes(keep_axes, x.ndim - 1)
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


@dataclasses.dataclass(frozen=True)
class AttentionToLanguage:
    """Result of :func:`attention_to_language`; every entry is a mean of per-(query, head) masses in [0, 1].

    Attributes:
        per_step_layer: [S, L] mean over batch, heads and the selected queries.
        per_layer: [L] ``per_step_layer`` averaged over denoising steps.
        per_step: [S] ``per_step_layer`` averaged over layers.
        overall: mean of ``per_step_layer``.
        state_token: [S, L] the state-token query (query 0) only, mean over batch and heads.
        action_tokens: [S, L] the action-token queries (1:) only; NaN if there are none.
    """

    per_step_layer: np.ndarray
    per_layer: np.ndarray
    per_step: np.ndarray
    overall: float
    state_token: np.ndarray
    action_tokens: np.ndarray


def attention_to_language(attention_to_text, *, query_slice: slice | None = None) -> AttentionToLanguage:
    """Summarize captured ``attention_to_text`` [S, L, B, heads, Ts] (each expert-1 query's mass on valid text keys).

    ``query_slice`` picks the queries behind ``per_step_layer`` / ``per_layer`` / ``per_step`` / ``overall`` (default:
    all Ts = 1 + H). Query 0 is pi0's state token; queries 1: are the action tokens. The S axis holds the captured
    denoising steps in capture order (step 0 is t = 1.0; see ``denoise_times``). To pool several inferences,
    concatenate them along B.
    """
    a = np.asarray(attention_to_text).astype(np.float64)
    if a.ndim != 5:
        raise ValueError(f"expected [S, L, B, heads, Ts], got shape {a.shape}")
    sel = a[..., query_slice if query_slice is not None else slice(None)]
    psl = sel.mean(axis=(2, 3, 4))
    actions = a[..., 1:]
    return AttentionToLanguage(
        per_step_layer=psl,
        per_layer=psl.mean(0),
        per_step=psl.mean(1),
        overall=float(psl.mean()),
        state_token=a[..., 0].mean(axis=(2, 3)),
        action_tokens=actions.mean(axis=(2, 3, 4)) if actions.shape[-1] else np.full(a.shape[:2], np.nan),
    )
