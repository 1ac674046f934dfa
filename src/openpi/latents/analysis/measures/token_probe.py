"""Held-out linear probes of token identity (with a control task) and the tuned lens. Plain numpy.

Both read rows of states ``x`` [N, W] at the prompt's *content* positions (``text_mask`` without the first valid
position, BOS, and the last, the trailing ``"\\n"``: the same token for every prompt, so trivially decodable from
position alone), with the token id of each row, the group each row is held out with, and (probe) its prompt slot.

Held-out protocol: folds grouped by ``groups`` (the analysis passes the task id by default: every episode of a task
shares its prompt, so an episode split lets a probe memorise "task, position → token"; a task split asks for the
token in prompts the probe never saw). A test row counts only when its label occurs in the training folds (a class
never trained on cannot be predicted); ``coverage`` says which share of the test rows that left.

* :func:`token_identity_probe`: a ridge-regularised least-squares linear classifier (one-hot targets, argmax; the
  closed form keeps it deterministic and fast with ~100 classes and W = 2048) of the token id.
  Control task (Hewitt & Liang 2019, adapted): the unit a probe can memorise without reading the token is the prompt
  *slot* (task, position), which holds the same token in every episode of a task. The control relabels each slot with
  the token of another slot (a random permutation of the slots' tokens, so exactly the real label distribution over
  slots) and runs the same protocol. Selectivity = accuracy − control accuracy: high when the probe reads token
  identity, ~0 when it reads only context (or nothing). (Mapping each token *type* to a random label, the
  word-level control of Hewitt & Liang, is a function of the very label decoded here: a perfect token encoding would
  score 1 on it too, and a one-to-one relabelling scores exactly the real accuracy; it is offered as
  ``control="type"`` for a probe-capacity reading.)
* :func:`tuned_lens`: per layer an affine translator ``T(h) = A h + b`` (ridge least squares) from the layer's states to
  the final representation at the same position, fitted on the training folds; evaluated on the held-out rows through
  the tied unembedding: ``z = E · T(h)`` when the target is expert 0's output after its final norm (captured with
  ``CaptureSpec.final_norm``: where the norm belongs), else ``z = E · RMSNorm_final(T(h))`` on the last captured layer.
  Reports top-1 (the prompt token has the top logit), mean rank and NLL of the prompt token, beside the plain logit
  lens on the same held-out rows. The translator is fitted by least squares to the final state (Belrose et al. 2023
  minimise a KL to the final layer's distribution instead; with a 257k vocabulary the closed form is what a CPU
  affords, and it makes the lens read what the final representation holds, not more).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from openpi.latents.analysis.measures.arrays import ROW_BLOCK
from openpi.latents.analysis.measures.text_decoding import final_rms_norm

__all__ = ["LensResult", "TokenProbeResult", "control_labels", "token_identity_probe", "tuned_lens", "vocab_scores"]


def _folds(groups: np.ndarray, n_splits: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Grouped folds: the sorted unique groups dealt round-robin into ``min(n_splits, n_groups)`` folds."""
    uniq = np.unique(groups)
    k = min(n_splits, len(uniq))
    if k < 2:
        return []
    fold_of = {g: i % k for i, g in enumerate(uniq)}
    f = np.array([fold_of[g] for g in groups])
    return [(np.nonzero(f != i)[0], np.nonzero(f == i)[0]) for i in range(k)]


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return (train - mu) / sd, (test - mu) / sd


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Weights [D+1, K] of ``[x, 1] @ w ≈ y`` with penalty ``alpha · mean eigenvalue`` (bias not penalised much)."""
    xa = np.concatenate([x, np.ones((len(x), 1))], 1)
    lam = alpha * max(float(np.einsum("ij,ij->", x, x)) / max(x.shape[1], 1), 1e-12)
    if len(xa) < xa.shape[1]:  # dual form: N×N
        g = xa @ xa.T
        g[np.diag_indices_from(g)] += lam
        return xa.T @ np.linalg.solve(g, y)
    g = xa.T @ xa
    g[np.diag_indices_from(g)] += lam
    return np.linalg.solve(g, xa.T @ y)


def _predict(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((len(x), 1))], 1) @ w


def control_labels(tokens: np.ndarray, slots: np.ndarray, *, kind: str = "slot", seed: int = 0) -> np.ndarray:
    """Control-task label of each row: ``"slot"``: each slot gets the token of another slot (a random permutation of
    the slots' tokens); ``"type"``: each token type gets a type drawn from the empirical distribution of the rows."""
    rng = np.random.default_rng(seed)
    if kind == "type":
        types, counts = np.unique(tokens, return_counts=True)
        mapped = rng.choice(types, size=len(types), p=counts / counts.sum())
        return mapped[np.searchsorted(types, tokens)]
    if kind != "slot":
        raise ValueError(f"control must be 'slot' or 'type', got {kind!r}")
    uniq, first = np.unique(slots, return_index=True)
    slot_token = tokens[first]
    perm = slot_token[rng.permutation(len(uniq))]
    return perm[np.searchsorted(uniq, slots)]


@dataclasses.dataclass(frozen=True)
class TokenProbeResult:
    """Outcome of :func:`token_identity_probe` (fractions in [0, 1]; NaN with ``reason`` when not computable).

    ``accuracy``: held-out accuracy over the scored test rows of every fold pooled; ``control_accuracy``: the same for
    the control task; ``selectivity`` = accuracy − control_accuracy; ``majority``: held-out accuracy of always
    predicting the training folds' most frequent token; ``coverage``: share of test rows whose token occurs in the
    training folds (the rest are not scored); sizes: rows, groups, token types, folds.
    """

    accuracy: float
    control_accuracy: float
    selectivity: float
    majority: float
    coverage: float
    n_rows: int
    n_groups: int
    n_classes: int
    n_splits: int
    fold_accuracies: tuple[float, ...] = ()
    reason: str | None = None


def _heldout_accuracy(x, y, folds, alpha) -> tuple[float, float, float, list[float]]:
    """(accuracy, majority baseline, coverage, per-fold accuracies) of the ridge probe over grouped folds."""
    hit = maj = scored = total = 0
    per_fold = []
    for tr, te in folds:
        classes, inv = np.unique(y[tr], return_inverse=True)
        known = np.isin(y[te], classes)
        total += len(te)
        if not known.any():
            continue
        xtr, xte = _standardise(x[tr], x[te][known])
        w = _ridge(xtr, np.eye(len(classes))[inv], alpha)
        pred = classes[np.argmax(_predict(xte, w), 1)]
        ok = pred == y[te][known]
        hit, scored = hit + ok.sum(), scored + known.sum()
        maj += (y[te][known] == classes[np.argmax(np.bincount(inv))]).sum()
        per_fold.append(float(ok.mean()))
    if not scored:
        return float("nan"), float("nan"), 0.0, per_fold
    return hit / scored, maj / scored, scored / total, per_fold


def token_identity_probe(
    x, tokens, groups, slots, *, n_splits: int = 5, alpha: float = 1e-2, control: str = "slot", seed: int = 0
) -> TokenProbeResult:
    """Held-out linear probe of the token id from states ``x`` [N, W], folds grouped by ``groups`` [N], with the
    control task of ``slots`` [N] (see the module docstring). Float64."""
    x = np.asarray(x, np.float64)
    tokens, groups, slots = (np.asarray(a) for a in (tokens, groups, slots))
    n_groups, n_classes = len(np.unique(groups)), len(np.unique(tokens))
    folds = _folds(groups, n_splits)
    nan = float("nan")
    if not folds:
        return TokenProbeResult(nan, nan, nan, nan, 0.0, len(x), n_groups, n_classes, 0, reason="needs two groups")
    acc, maj, cov, per_fold = _heldout_accuracy(x, tokens, folds, alpha)
    ctrl, _, _, _ = _heldout_accuracy(x, control_labels(tokens, slots, kind=control, seed=seed), folds, alpha)
    reason = None if cov > 0 else "no test token occurs in the training folds"
    return TokenProbeResult(
        acc, ctrl, acc - ctrl, maj, cov, len(x), n_groups, n_classes, len(folds), tuple(per_fold), reason
    )


def vocab_scores(h, ids, embedding, *, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(nll [N] nats, rank [N]) of token ``ids`` under logits ``z = E · h`` (``h`` [N, W] already in the space the
    unembedding reads), streamed over vocab chunks; rank = #{v ≠ id : z[v] > z[id]}."""
    h = np.asarray(h, np.float32)
    ids = np.asarray(ids, np.int64)
    vocab = embedding.shape[0]
    true_z = np.einsum("nw,nw->n", h, np.asarray(embedding[ids], np.float32))
    m, s, rank = np.full(len(h), -np.inf), np.zeros(len(h)), np.zeros(len(h), np.int64)
    for start in range(0, vocab, chunk):
        e = np.asarray(embedding[start : start + chunk], np.float32)
        for r in range(0, len(h), ROW_BLOCK):
            blk = slice(r, r + ROW_BLOCK)
            z = h[blk] @ e.T
            new_m = np.maximum(m[blk], z.max(-1))
            s[blk] = s[blk] * np.exp(m[blk] - new_m) + np.exp(z - new_m[:, None]).sum(-1, dtype=np.float64)
            m[blk] = new_m
            greater = z > true_z[blk, None]
            local = ids[blk] - start
            inside = np.nonzero((local >= 0) & (local < len(e)))[0]
            greater[inside, local[inside]] = False
            rank[blk] += greater.sum(-1)
    return np.maximum(m + np.log(s) - true_z, 0.0), rank


@dataclasses.dataclass(frozen=True)
class LensResult:
    """Outcome of :func:`tuned_lens` on the held-out rows (NaN with ``reason`` when not computable).

    ``top1`` / ``mean_rank`` / ``nll``: the tuned lens; ``logit_top1`` / ``logit_rank``: the plain logit lens on the
    same rows (no translator; the final norm applied as the target's space asks); ``translator_r2``: held-out R² of
    the translator's fit to the final representation; sizes.
    """

    top1: float
    mean_rank: float
    nll: float
    logit_top1: float
    logit_rank: float
    translator_r2: float
    n_rows: int
    n_groups: int
    n_splits: int
    reason: str | None = None


def tuned_lens(
    x,
    target,
    tokens,
    groups,
    embedding,
    final_norm_scale=None,
    *,
    target_normed: bool,
    n_splits: int = 5,
    alpha: float = 1e-3,
    max_eval_rows: int = 1024,
    seed: int = 0,
) -> LensResult:
    """The tuned lens of states ``x`` [N, W] towards ``target`` [N, W] (see the module docstring); ``target_normed``:
    the target is already after the final norm (then ``final_norm_scale`` is not used). At most ``max_eval_rows``
    held-out rows (a fixed random subset) are decoded against the whole vocabulary."""
    x, target = np.asarray(x, np.float64), np.asarray(target, np.float64)
    tokens, groups = np.asarray(tokens, np.int64), np.asarray(groups)
    folds = _folds(groups, n_splits)
    n_groups = len(np.unique(groups))
    if not folds:
        nan = float("nan")
        return LensResult(nan, nan, nan, nan, nan, nan, len(x), n_groups, 0, reason="needs two groups")

    def to_vocab_space(h):
        return h if target_normed else final_rms_norm(h, _scale(final_norm_scale, h.shape[1]))

    pred, raw, ss_res, ss_tot = [], [], 0.0, 0.0
    for tr, te in folds:
        mu = x[tr].mean(0)
        w = _ridge(x[tr] - mu, target[tr], alpha)
        p = _predict(x[te] - mu, w)
        ss_res += float(((p - target[te]) ** 2).sum())
        ss_tot += float(((target[te] - target[tr].mean(0)) ** 2).sum())
        pred.append(p)
        raw.append(te)
    order = np.concatenate(raw)
    pred = np.concatenate(pred)
    keep = np.random.default_rng(seed).permutation(len(order))[:max_eval_rows]
    rows, ids = order[keep], tokens[order[keep]]
    nll, rank = vocab_scores(to_vocab_space(pred[keep]), ids, embedding)
    # the plain logit lens on the same rows: E · RMSNorm_final(h) of the layer's own state (the registry's logit lens)
    _, raw_rank = vocab_scores(final_rms_norm(x[rows], _scale(final_norm_scale, x.shape[1])), ids, embedding)
    return LensResult(
        float((rank == 0).mean()),
        float(rank.mean()),
        float(nll.mean()),
        float((raw_rank == 0).mean()),
        float(raw_rank.mean()),
        1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
        len(keep),
        n_groups,
        len(folds),
    )


def _scale(scale, width: int) -> np.ndarray:
    return np.zeros(width, np.float32) if scale is None else np.asarray(scale, np.float32)
