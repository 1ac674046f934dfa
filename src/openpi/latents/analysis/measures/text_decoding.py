"""Text decoding metrics: text reconstruction (nearest token embedding) and the same-position logit lens.

Definitions in :mod:`openpi.latents.analysis.measures` (which re-exports everything here). Plain numpy.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from openpi.latents.analysis.measures.arrays import ROW_BLOCK, norm_axes, reduce_valid, scatter, valid_rows

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
    rows, ids, valid = valid_rows(hidden, token_ids, mask, vocab)
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
        for r in range(0, len(rows), ROW_BLOCK):
            s = unit[r : r + ROW_BLOCK] @ e.T
            s *= inv  # cosine
            s[:, enorm == 0] = -np.inf
            loc = s.argmax(-1)
            val = s[np.arange(len(s)), loc]
            upd = val > best[r : r + ROW_BLOCK]  # strict: the lowest id wins ties
            best[r : r + ROW_BLOCK][upd] = val[upd]
            arg[r : r + ROW_BLOCK][upd] = loc[upd] + start
    arg[hnorm == 0] = -1
    true_e = np.asarray(embedding[ids] if ids.size else np.zeros((0, width))).astype(np.float32)
    tnorm = np.linalg.norm(true_e, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tcos = (np.einsum("nw,nw->n", unit, true_e) / tnorm).astype(np.float32)
    tcos[(hnorm == 0) | (tnorm == 0)] = np.nan

    pred = scatter(arg, valid, -1)
    correct = scatter(arg == ids, valid, False)
    keep = norm_axes(keep_axes, valid.ndim)
    acc = reduce_valid(correct, valid, keep, np.mean)
    n_valid = reduce_valid(np.ones(valid.shape), valid, keep, np.sum)
    n_valid = int(np.nan_to_num(n_valid)) if np.ndim(n_valid) == 0 else np.nan_to_num(n_valid).astype(np.int64)
    return TextReconstruction(acc, 1 - acc, n_valid, pred, scatter(tcos, valid, np.float32(np.nan)), correct, valid)


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
    rows, ids, valid = valid_rows(hidden, token_ids, mask, vocab)
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
        for r in range(0, len(rows), ROW_BLOCK):
            blk = slice(r, r + ROW_BLOCK)
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
    keep = norm_axes(keep_axes, valid.ndim)
    nll_full = scatter(nll, valid, np.nan)
    rank_full = scatter(rank, valid, -1)
    n_valid = reduce_valid(np.ones(valid.shape), valid, keep, np.sum)
    n_valid = int(np.nan_to_num(n_valid)) if np.ndim(n_valid) == 0 else np.nan_to_num(n_valid).astype(np.int64)
    return LogitLens(
        mean_nll=reduce_valid(nll_full, valid, keep, np.mean),
        mean_rank=reduce_valid(rank_full, valid, keep, np.mean),
        median_rank=reduce_valid(rank_full, valid, keep, np.median),
        top1=reduce_valid(rank_full == 0, valid, keep, np.mean),
        n_valid=n_valid,
        nll=nll_full,
        rank=rank_full,
        valid=valid,
    )
