"""Representation geometry: linear CKA between two sets of states, and the effective rank of one. Plain numpy.

Both take states as rows ``x`` [N, D] (one row per sample: a token position of one rollout step, one inference, ...);
two representations compared by CKA must hold the *same* N samples in the same order (their widths may differ).

* Linear CKA (Kornblith et al. 2019): with the linear kernels ``K = X Xᵀ`` and ``L = Y Yᵀ``,
  ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))``. :func:`linear_cka` uses the *unbiased* HSIC estimator
  (Song et al. 2012; "debiased CKA", Davari et al. 2022) by default: the plain (biased) estimator of two independent
  representations is not ~0 when the width is comparable to N (for N = 1000 samples of independent 2048-wide noise it
  reads ≈ 0.7), which would make unrelated layers look similar. Invariant to orthogonal transforms and isotropic
  scaling of either side, and to adding a constant to every row (centring); 1 for a representation with itself. The
  debiased value can be slightly negative for unrelated representations. ``debiased=False`` gives the textbook
  ``‖Ycᵀ Xc‖²_F / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F)`` on column-centred X, Y.
* Effective rank (Roy & Vetterli 2007): centre the columns, take the singular values σ_i, normalise
  ``p_i = σ_i / Σ_j σ_j`` and return ``exp(−Σ p_i log p_i)``. In [1, min(N, D)]; exactly k for k equal non-zero
  singular values (a rank-k isotropic cloud); NaN for an all-constant input.

:class:`Gram` holds what CKA needs of one representation ([N, N], so N, not the width, bounds memory): the analysis
keeps one per layer to compare every pair of layers without holding the states.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Gram", "cka_from_grams", "effective_rank", "gram", "linear_cka"]


@dataclasses.dataclass(frozen=True)
class Gram:
    """What the CKA estimators need of one representation of N samples.

    ``k``: the linear kernel ``X Xᵀ`` (debiased: with its diagonal set to 0; plain: double-centred) in float64;
    ``row_sums``: ``k @ 1``; ``total``: ``1ᵀ k 1``; ``debiased``: which estimator it is for.
    """

    k: np.ndarray
    row_sums: np.ndarray
    total: float
    debiased: bool

    @property
    def n(self) -> int:
        return int(self.k.shape[0])


def gram(x, *, debiased: bool = True) -> Gram:
    """The :class:`Gram` of states ``x`` [N, D] (float64)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"states must be [N, D], got shape {x.shape}")
    if debiased:
        if len(x) < 4:
            raise ValueError(f"the unbiased HSIC estimator needs at least 4 samples, got {len(x)}")
        k = x @ x.T
        np.fill_diagonal(k, 0.0)
    else:
        xc = x - x.mean(0, keepdims=True)
        k = xc @ xc.T
    rs = k.sum(1)
    return Gram(k, rs, float(rs.sum()), debiased)


def _hsic(a: Gram, b: Gram) -> float:
    if not a.debiased:
        return float(np.sum(a.k * b.k))  # both double-centred: tr(K H L H) up to a constant that cancels in CKA
    n = a.n
    return float(
        (np.sum(a.k * b.k) + a.total * b.total / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (a.row_sums @ b.row_sums))
        / (n * (n - 3))
    )


def cka_from_grams(a: Gram, b: Gram) -> float:
    """CKA of two representations from their :class:`Gram` s (same samples, same estimator); NaN if either is
    constant (zero self-similarity)."""
    if a.n != b.n or a.debiased != b.debiased:
        raise ValueError(f"grams differ: {a.n} vs {b.n} samples, debiased {a.debiased} vs {b.debiased}")
    den = _hsic(a, a) * _hsic(b, b)
    if not den > 0:
        return float("nan")
    return _hsic(a, b) / float(np.sqrt(den))


def linear_cka(x, y, *, debiased: bool = True) -> float:
    """Linear CKA between states ``x`` [N, Dx] and ``y`` [N, Dy] of the same N samples (see the module docstring)."""
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"CKA compares the same samples: got {len(x)} and {len(y)} rows")
    return cka_from_grams(gram(x, debiased=debiased), gram(y, debiased=debiased))


def effective_rank(x) -> float:
    """``exp(entropy(σ / Σσ))`` of the singular values σ of the column-centred states ``x`` [N, D] (float64)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or min(x.shape) == 0:
        raise ValueError(f"states must be a non-empty [N, D], got shape {x.shape}")
    s = np.linalg.svd(x - x.mean(0, keepdims=True), compute_uv=False)
    total = s.sum()
    if not total > 0:
        return float("nan")
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))
