"""A cheap exact permutation test for the task probe: a ridge (least-squares) classifier refit in closed form.

Why not permute the logistic probe 1000 times: each permutation refits ``n_splits`` logistic regressions, so 1000
permutations × 5 folds × every layer of every stream is hours. Permuting only the held-out labels against fixed
cross-validated predictions is not valid either: those predictions were trained on the true labels of the other
folds, which the null must also scramble.

A least-squares classifier's scores are *linear in the training labels*: with standardised features X (scaler fit
on the training fold) and one-hot labels Y, ``scores(X_test) = X_test (XᵀX + αI)⁻¹ Xᵀ (Y − ȳ) + ȳ``. The matrix in
front of Y depends on the features only, so it is computed once per fold and every permutation's *refit* is one
matrix product. The test is exact for its own statistic (the ridge classifier's held-out accuracy on the same folds),
which is what the permutation p-value needs: under the null "the features carry no information about the label",
relabelling whole groups (episodes keep one label) leaves the joint distribution unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["PermutationTest", "group_folds", "ridge_permutation_test"]

_BLOCK_ELEMENTS = 20_000_000  # permutations × test rows × classes per batched product


@dataclasses.dataclass(frozen=True)
class PermutationTest:
    """Outcome of :func:`ridge_permutation_test`.

    Attributes:
        accuracy: the ridge classifier's held-out accuracy with the true labels (mean over folds).
        null: [n_permutations] the same with group labels permuted.
        p_value: ``(1 + #{null ≥ accuracy}) / (1 + n_permutations)``.
        p_floor: ``1 / (1 + n_permutations)``, the smallest reachable p-value.
    """

    accuracy: float
    null: np.ndarray
    p_value: float
    p_floor: float


def _fold_operator(x: np.ndarray, gram: np.ndarray | None, train, test, group_index, n_groups: int, alpha: float):
    """(P [n_test, n_groups] with scores = P @ (Y_groups − ȳ) + ȳ, train group counts [n_groups]).

    ``x`` is standardised over all samples (label-free, so the permutation null is untouched) and centred on the
    training fold here; ``gram`` = XᵀX of all samples (float32) when the primal form is used."""
    xtr, xte = x[train], x[test]
    mu = xtr.mean(0)
    member = np.zeros((len(train), n_groups), np.float32)
    member[np.arange(len(train)), group_index[train]] = 1.0
    n, d = xtr.shape
    if gram is not None:  # primal: (XcᵀXc + αI)⁻¹ Xcᵀ G, Xc = X_train − μ; XcᵀXc = XᵀX_all − XᵀX_test − n μμᵀ
        xt = x[test]
        a = gram.astype(np.float64) - (xt.T @ xt).astype(np.float64) - n * np.outer(mu, mu)
        xg = (xtr.T @ member).astype(np.float64) - np.outer(mu, member.sum(0))
        op = (xte - mu).astype(np.float64) @ np.linalg.solve(a + alpha * np.eye(d), xg)
    else:  # dual: Xcᵀ (XcXcᵀ + αI)⁻¹ G, the same matrix
        xc = (xtr - mu).astype(np.float64)
        op = ((xte - mu).astype(np.float64) @ xc.T) @ np.linalg.solve(xc @ xc.T + alpha * np.eye(n), member)
    return op, member.sum(0).astype(np.float64)


def group_folds(group_index, n_splits: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(train, test)] folds over whole groups that do not look at the labels: groups dealt round-robin into
    ``n_splits`` folds after a seeded shuffle. Label-stratified folds (the logistic probe's) would break the
    permutation test's exchangeability: under a relabelling they are no longer stratified, which lowers the null's
    accuracy and makes the test anti-conservative."""
    gi = np.asarray(group_index)
    uniq = np.unique(gi)
    fold_of = np.empty(int(uniq.max()) + 1, np.int64)
    fold_of[np.random.default_rng(seed).permutation(uniq)] = np.arange(len(uniq)) % n_splits
    folds = fold_of[gi]
    return [(np.flatnonzero(folds != k), np.flatnonzero(folds == k)) for k in range(min(n_splits, len(uniq)))]


def ridge_permutation_test(
    features, labels, group_index, splits, *, n_permutations: int = 1000, seed: int = 0, alpha: float = 1.0
) -> PermutationTest:
    """Permutation test of decodability with a ridge classifier on the given folds (see the module docstring).

    Features are standardised over all samples (label-free) in float32; the normal equations are solved in float64.
    ``features`` [n, d], ``labels`` [n] (one label per group), ``group_index`` [n] in ``0..G-1``, ``splits`` the
    [(train, test)] folds of the probe. Permutations relabel whole groups (a random permutation of the per-group
    labels), drawn from ``seed``; the identity gives the observed accuracy. Training centres the labels (ȳ: class
    shares of the training fold under the permutation), so an intercept is fit as well.
    """
    x = np.asarray(features, np.float32)
    mu, sd = x.mean(0), x.std(0)
    x = (x - mu) / np.where(sd > 0, sd, 1.0)
    n_train_max = max(len(tr) for tr, _ in splits)
    gram = x.T @ x if x.shape[1] <= n_train_max else None
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    gi = np.asarray(group_index)
    n_groups = int(gi.max()) + 1
    group_label = np.zeros(n_groups, np.int64)
    group_label[gi] = y
    rng = np.random.default_rng(seed)
    perms = np.stack([group_label] + [rng.permutation(group_label) for _ in range(n_permutations)])  # [1+P, G]
    onehot = np.eye(len(classes))[perms]  # [1+P, G, C]
    acc = np.zeros(len(perms))
    for train, test in splits:
        op, counts = _fold_operator(x, gram, train, test, gi, n_groups, alpha)
        ybar = np.einsum("g,pgc->pc", counts, onehot) / counts.sum()
        truth = perms[:, gi[test]]  # [1+P, n_test]
        block = max(1, _BLOCK_ELEMENTS // max(len(test) * len(classes), 1))
        for s in range(0, len(perms), block):
            sl = slice(s, s + block)
            centred = onehot[sl] - ybar[sl, None, :]  # [p, G, C]
            p_, g_, c_ = centred.shape
            scores = (op @ centred.transpose(1, 0, 2).reshape(g_, p_ * c_)).reshape(len(test), p_, c_)
            scores += ybar[sl][None]
            acc[sl] += np.mean(scores.argmax(-1).T == truth[sl], axis=1)
    acc /= len(splits)
    observed, null = float(acc[0]), acc[1:]
    p = float((1 + np.sum(null >= observed - 1e-12)) / (1 + n_permutations)) if n_permutations else float("nan")
    return PermutationTest(observed, null, p, 1.0 / (1 + n_permutations))
