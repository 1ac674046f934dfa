"""Array helpers shared by the metrics: valid-position masks and reductions over every axis but the kept ones.

The axis convention (``keep_axes``) is the one of :mod:`openpi.latents.analysis.measures`.
"""

from __future__ import annotations

import numpy as np

ROW_BLOCK = 2048  # positions per matmul block

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


def norm_axes(keep_axes, ndim: int) -> tuple[int, ...]:
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


def scalar_or(x: np.ndarray):
    return x.item() if x.ndim == 0 else x


def reduce_valid(values: np.ndarray, valid: np.ndarray, keep: tuple[int, ...], fn) -> float | np.ndarray:
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
    return scalar_or(out)


def valid_rows(hidden, token_ids, mask, vocab: int):
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


def scatter(values: np.ndarray, valid: np.ndarray, fill) -> np.ndarray:
    out = np.full(valid.shape, fill, dtype=values.dtype)
    out[valid] = values
    return out


def informative_text_mask(text_mask) -> np.ndarray:
    """``text_mask`` [..., T] without each row's first and last valid position.

    pi0's tokenizer lays the prompt out as ``[BOS] prompt tokens ["\\n"]`` (``openpi.models.tokenizer``): BOS and the
    trailing ``"\\n"`` are the same for every prompt, so they carry no information about it and would inflate text
    decoding, probes and attention to text (BOS is an attention sink). A row with two valid positions or fewer keeps
    none. (pi0.5's discrete-state prompt also starts with BOS and ends in the constant ``"Action: "``.)
    """
    m = np.asarray(text_mask).astype(bool)
    if m.shape[-1] == 0:
        return m.copy()
    idx = np.arange(m.shape[-1])
    first = np.where(m.any(-1), m.argmax(-1), -1)
    last = np.where(m.any(-1), m.shape[-1] - 1 - m[..., ::-1].argmax(-1), -1)
    return m & (idx != first[..., None]) & (idx != last[..., None])
