"""The task-decoding probe: cross-validated multinomial logistic regression of a label (the task id) from features,
folds grouped by episode, with chance levels, a group-level shuffled-label control and a permutation p-value.

Pure numpy / scikit-learn, deterministic given ``seed``. Re-exported by :mod:`openpi.latents.analysis.measures`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np

__all__ = ["ProbeResult", "task_probe"]


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """Outcome of :func:`task_probe`. Accuracies are fractions in [0, 1]; NaN means "not computable" (see ``reason``).

    Attributes:
        accuracy: mean over folds of the held-out accuracy (fraction of test samples whose predicted label is right).
        accuracy_ci: Student-t interval of that mean over the folds, ``mean ± t(1-α/2, k-1)·sd/sqrt(k)``, clipped to
            [0, 1]. Folds share training data, so this interval is optimistic; read it as fold-to-fold spread.
        fold_accuracies: [k] held-out accuracy of each fold.
        chance_majority: share of the most frequent label among all samples (accuracy of always guessing it).
        chance_uniform: 1 / n_classes.
        shuffled_mean: mean cross-validated accuracy over the label permutations (same folds, labels permuted across
            groups so that each group keeps a single label). NaN when the control was not run (see ``notes``).
        shuffled_ci: central ``ci`` percentile interval of the shuffled accuracies.
        shuffled_accuracies: [n_shuffles] the mean-over-folds accuracy of each permutation.
        p_value: the permutation p-value of decodability. With ``n_permutations > 0`` (default 1000): from
            :func:`~openpi.latents.analysis.measures.probe_permutation.ridge_permutation_test`,
            a ridge classifier refit in
            closed form under each group-label permutation on the same folds (exact for its own statistic, cheap).
            With ``n_permutations=0``: the shuffled logistic control's ``shuffled_p_value``.
        p_floor: the smallest p-value the test could give, ``1 / (1 + permutations)``.
        n_permutations: permutations behind ``p_value``.
        p_value_test: which test gave ``p_value`` ("ridge permutation", "logistic shuffles" or None).
        permutation_accuracy: the ridge classifier's held-out accuracy (the statistic the permutations test).
        permutation_null_mean: mean ridge accuracy under the permutations.
        shuffled_p_value: ``(1 + #{shuffled >= accuracy}) / (1 + n_shuffles)`` of the logistic shuffled control
            (floor ``1 / (1 + n_shuffles)``: with 10 shuffles it can never reach 0.05).
        n_splits: number of folds actually used (may be smaller than requested, see ``notes``).
        n_samples, n_groups, n_classes: sizes of the input.
        notes: human-readable remarks (fewer folds, dropped empty folds, single-class training folds, non-convergence).
        reason: why ``accuracy`` is NaN, or None.
    """

    accuracy: float
    accuracy_ci: tuple[float, float]
    fold_accuracies: np.ndarray
    chance_majority: float
    chance_uniform: float
    shuffled_mean: float
    shuffled_ci: tuple[float, float]
    shuffled_accuracies: np.ndarray
    p_value: float
    n_splits: int
    n_samples: int
    n_groups: int
    n_classes: int
    notes: tuple[str, ...] = ()
    reason: str | None = None
    p_floor: float = float("nan")
    n_permutations: int = 0
    p_value_test: str | None = None
    permutation_accuracy: float = float("nan")
    permutation_null_mean: float = float("nan")
    shuffled_p_value: float = float("nan")


def _t_interval(x: np.ndarray, ci: float) -> tuple[float, float]:
    from scipy import stats as sps

    k = len(x)
    m = float(np.mean(x))
    if k < 2:
        return (float("nan"), float("nan"))
    half = float(sps.t.ppf(0.5 + ci / 2, k - 1) * np.std(x, ddof=1) / np.sqrt(k))
    return (max(0.0, m - half), min(1.0, m + half))


def _cv_accuracy(x, y, splits, c, max_iter, notes: set[str]) -> np.ndarray:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    accs = []
    for train, test in splits:
        classes = np.unique(y[train])
        if len(classes) == 1:
            notes.add("a training fold held one class; that fold predicts it for every test sample")
            pred = np.full(len(test), classes[0])
        else:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model.fit(x[train], y[train])
            if any(issubclass(w.category, ConvergenceWarning) for w in caught):
                notes.add(f"lbfgs did not converge within max_iter={max_iter} in some fits")
            pred = model.predict(x[test])
        accs.append(float(np.mean(pred == y[test])))
    return np.asarray(accs)


def task_probe(
    features,
    labels,
    groups,
    *,
    n_splits: int = 5,
    seed: int = 0,
    n_shuffles: int = 10,
    ci: float = 0.95,
    C: float = 1.0,
    max_iter: int = 1000,
    n_permutations: int = 1000,
) -> ProbeResult:
    """Cross-validated linear probe: how well can ``labels`` be decoded from ``features``?

    Model: ``StandardScaler`` (fit on the training fold only) followed by multinomial ``LogisticRegression`` (lbfgs,
    L2 penalty with inverse strength ``C``). Folds: ``StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)``
    over ``groups``, so no group (use the episode) is in both train and test; rollout steps of one episode are strongly
    correlated and would otherwise leak. Empty test folds are dropped.

    Score: held-out accuracy per fold; ``accuracy`` is their mean, ``accuracy_ci`` a t-interval over folds.

    Shuffled-label control: each group is given the label of another group (a random permutation of the per-group
    labels, so a whole episode keeps one label), then the same folds are scored; repeated ``n_shuffles`` times.
    Requires every group to carry a single label; otherwise the control is skipped (NaN, noted).

    Degenerate inputs give NaN with ``reason``: fewer than two classes, or fewer than two groups. When there are fewer
    groups than ``n_splits``, the number of folds is reduced to the number of groups (noted).

    Args:
        features: [n, d] (any float dtype, bf16 included; upcast to float64).
        labels: [n] class labels (any hashable numpy dtype).
        groups: [n] group ids (episode ids).
        n_splits: requested number of folds.
        seed: seeds the fold assignment and the permutations.
        n_shuffles: number of label permutations for the control (0 skips it). Each costs ``n_splits`` fits.
        ci: coverage of the fold interval and of the shuffled interval.
        C, max_iter: passed to ``LogisticRegression``.
        n_permutations: group-label permutations of the ridge permutation test behind ``p_value`` (0: use the
            logistic shuffles instead). Needs one label per group (else skipped, noted).
    """
    x, y, g, sizes = _probe_inputs(features, labels, groups)
    uniq_groups = np.unique(g)
    notes: set[str] = set()
    if sizes["n_classes"] < 2:
        return _empty_probe(f"only {sizes['n_classes']} class(es) in labels: nothing to decode", 0, notes, sizes)
    if sizes["n_groups"] < 2:
        return _empty_probe(f"only {sizes['n_groups']} group(s): cannot hold out a group", 0, notes, sizes)
    k, splits = _folds(x, y, g, n_splits, len(uniq_groups), seed, notes)
    if not splits:
        why = "no usable fold" if k >= 2 else "one sample per class: nothing to hold out"
        return _empty_probe(why, k, notes, sizes)
    fold_acc = _cv_accuracy(x, y, splits, C, max_iter, notes)
    acc = float(fold_acc.mean())
    shuffled = _shuffled_control(x, y, np.searchsorted(uniq_groups, g), splits, n_shuffles, seed, (C, max_iter), notes)
    s_mean, s_ci, s_p = _control_summary(shuffled, acc, ci)
    perm = _permutation(x, y, np.searchsorted(uniq_groups, g), splits, n_permutations, seed, notes)
    if perm is not None:
        p_fields = dict(
            p_value=perm.p_value,
            p_floor=perm.p_floor,
            n_permutations=n_permutations,
            p_value_test="ridge permutation",
            permutation_accuracy=perm.accuracy,
            permutation_null_mean=float(perm.null.mean()),
        )
    else:
        n_sh = len(shuffled)
        p_fields = dict(
            p_value=s_p,
            p_floor=1.0 / (1 + n_sh) if n_sh else float("nan"),
            n_permutations=n_sh,
            p_value_test="logistic shuffles" if n_sh else None,
        )
    return ProbeResult(
        accuracy=acc,
        accuracy_ci=_t_interval(fold_acc, ci),
        fold_accuracies=fold_acc,
        shuffled_mean=s_mean,
        shuffled_ci=s_ci,
        shuffled_accuracies=shuffled,
        n_splits=len(splits),
        notes=tuple(sorted(notes)),
        shuffled_p_value=s_p,
        **p_fields,
        **sizes,
    )


def _permutation(x, y, group_index, splits, n_permutations: int, seed: int, notes: set[str]):
    """The ridge permutation test behind ``p_value``, or None when not run (0 permutations, mixed-label groups)."""
    from openpi.latents.analysis.measures.probe_permutation import group_folds, ridge_permutation_test

    if n_permutations <= 0:
        return None
    if any(len(np.unique(y[group_index == i])) > 1 for i in np.unique(group_index)):
        notes.add("permutation test skipped: some group carries more than one label")
        return None
    folds = group_folds(group_index, len(splits), seed)  # label-free folds (exchangeable under relabelling)
    return ridge_permutation_test(x, y, group_index, folds, n_permutations=n_permutations, seed=seed)


_NAN2 = (float("nan"), float("nan"))


def _probe_inputs(features, labels, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(x float64, y, g, the ProbeResult fields that only depend on the data: chance levels and counts)."""
    x = np.asarray(features).astype(np.float64)
    y = np.asarray(labels)
    g = np.asarray(groups)
    if x.ndim != 2 or y.shape != (x.shape[0],) or g.shape != (x.shape[0],):
        raise ValueError(f"need features [n, d], labels [n], groups [n]; got {x.shape}, {y.shape}, {g.shape}")
    n = x.shape[0]
    classes, counts = np.unique(y, return_counts=True)
    sizes = dict(
        chance_majority=float(counts.max() / n) if n else float("nan"),
        chance_uniform=1.0 / len(classes) if len(classes) else float("nan"),
        n_samples=n,
        n_groups=len(np.unique(g)),
        n_classes=len(classes),
    )
    return x, y, g, sizes


def _control_summary(shuffled: np.ndarray, acc: float, ci: float) -> tuple[float, tuple[float, float], float]:
    """(mean, interval, permutation p-value) of the shuffled-label control; NaN when it was not run."""
    if not len(shuffled):
        return float("nan"), _NAN2, float("nan")
    s_ci = (float(np.quantile(shuffled, 0.5 - ci / 2)), float(np.quantile(shuffled, 0.5 + ci / 2)))
    return float(shuffled.mean()), s_ci, float((1 + np.sum(shuffled >= acc)) / (1 + len(shuffled)))


def _empty_probe(reason: str, k: int, notes: set[str], sizes: dict) -> ProbeResult:
    nan = float("nan")
    return ProbeResult(
        accuracy=nan,
        accuracy_ci=_NAN2,
        fold_accuracies=np.zeros(0),
        shuffled_mean=nan,
        shuffled_ci=_NAN2,
        shuffled_accuracies=np.zeros(0),
        p_value=nan,
        n_splits=k,
        notes=tuple(sorted(notes)),
        reason=reason,
        **sizes,
    )


def _folds(x, y, g, n_splits: int, n_groups: int, seed: int, notes: set[str]) -> tuple[int, list]:
    """(requested folds, [(train, test)] without empty ones) of StratifiedGroupKFold, at most one fold per group."""
    from sklearn.model_selection import StratifiedGroupKFold

    k = n_splits
    if n_groups < n_splits:
        k = n_groups
        notes.add(f"n_splits reduced from {n_splits} to {k} (only {n_groups} groups)")
    largest = int(np.unique(y, return_counts=True)[1].max())
    if largest < k:  # sklearn refuses more folds than the largest class has samples
        notes.add(f"n_splits reduced from {k} to {largest} (the largest class has {largest} samples)")
        k = largest
    if k < 2:
        return k, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has fewer members than n_splits"
        splits = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(x, y, g))
    splits = [(tr, te) for tr, te in splits if len(te) and len(tr)]
    if len(splits) < k:
        notes.add(f"{k - len(splits)} empty fold(s) dropped")
    return k, splits


def _shuffled_control(x, y, group_index, splits, n_shuffles: int, seed: int, fit, notes: set[str]) -> np.ndarray:
    """Mean fold accuracy under ``n_shuffles`` permutations of the per-group labels (empty when not run)."""
    per_group = [np.unique(y[group_index == i]) for i in range(int(group_index.max()) + 1)]
    if n_shuffles > 0 and any(len(p) > 1 for p in per_group):
        notes.add("shuffled control skipped: some group carries more than one label")
        return np.zeros(0)
    if n_shuffles <= 0:
        return np.zeros(0)
    group_labels = np.array([p[0] for p in per_group])
    rng = np.random.default_rng(seed)
    return np.array(
        [
            _cv_accuracy(x, rng.permutation(group_labels)[group_index], splits, *fit, notes).mean()
            for _ in range(n_shuffles)
        ]
    )
