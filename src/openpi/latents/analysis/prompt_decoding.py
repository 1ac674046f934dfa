"""Matched-observation prompt decoding: which prompt was given, decoded from states whose observation is held fixed.

A counterfactual rerun computes the same observation (and noise) under a second prompt. Each observation i so gives
two states, ``base[i]`` under its prompt and ``cf[i]`` under the counterfactual prompt. A linear classifier is trained
to name the prompt of a state (labels: the prompt strings) on the pairs of some episodes and tested on the pairs of
the others (folds grouped by episode, so no observation, nor any other observation of its episode, is in both).

The score is the **pair accuracy**: the fraction of held-out observations whose two states are BOTH decoded to their
own prompts. The scene cannot answer this: a state that depends on the observation only is the same under both
prompts, gets the same prediction twice, and so is right on at most one of the two, a pair accuracy of exactly 0.
Guessing among K prompts independently scores 1/K² (``chance``). The per-state accuracy is reported beside it (a
scene-only state can reach 0.5 there when the scene tells the task apart).

Pure numpy / scikit-learn.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PromptDecoding:
    """Held-out matched-observation prompt decoding (see the module docstring); NaN with `reason` when undefined."""

    pair_correct: np.ndarray  # [N] 1.0 / 0.0 per observation (NaN: not held out in any fold)
    pair_accuracy: float  # mean of pair_correct
    state_accuracy: float  # fraction of held-out states (2 per observation) decoded to their own prompt
    chance: float  # 1 / K² for K prompts (independent uniform guesses)
    n_pairs: int
    n_groups: int
    n_classes: int
    n_splits: int
    reason: str | None = None


def _empty(n: int, reason: str, n_groups: int = 0, n_classes: int = 0) -> PromptDecoding:
    nan = float("nan")
    return PromptDecoding(np.full(n, np.nan), nan, nan, nan, n, n_groups, n_classes, 0, reason)


def matched_prompt_decoding(
    base: np.ndarray,
    cf: np.ndarray,
    base_labels,
    cf_labels,
    groups,
    *,
    n_splits: int = 5,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 1000,
) -> PromptDecoding:
    """Decodes the prompt from matched states (see the module docstring).

    Args:
        base, cf: [N, d] features of observation i under its prompt and under the counterfactual prompt.
        base_labels, cf_labels: [N] the two prompts of each observation (any hashable; equal labels are an error).
        groups: [N] group of each observation (the episode): folds never split a group.
        n_splits: folds (reduced to the number of groups when there are fewer, at least 2).
        seed: fold assignment. C, max_iter: ``LogisticRegression`` (L2, lbfgs) after a ``StandardScaler`` fitted on
            the training fold.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    base, cf = np.asarray(base, np.float64), np.asarray(cf, np.float64)
    yb, yc, g = np.asarray(base_labels), np.asarray(cf_labels), np.asarray(groups)
    n = len(base)
    if base.shape != cf.shape or not (len(yb) == len(yc) == len(g) == n):
        raise ValueError(
            f"shapes differ: base {base.shape}, cf {cf.shape}, labels {len(yb)}/{len(yc)}, groups {len(g)}"
        )
    if np.any(yb == yc):
        raise ValueError("an observation has the same prompt in both runs: nothing to tell apart")
    classes = np.unique(np.concatenate([yb, yc]))
    uniq = np.unique(g)
    if len(uniq) < 2:
        return _empty(n, f"only {len(uniq)} group(s): cannot hold out an episode", len(uniq), len(classes))
    k = min(n_splits, len(uniq))
    # GroupKFold is deterministic given the groups; permute the group ids with the seed for a seeded assignment.
    perm = np.random.default_rng(seed).permutation(len(uniq))
    shuffled = perm[np.searchsorted(uniq, g)]
    correct_b, correct_c = np.full(n, np.nan), np.full(n, np.nan)
    for train, test in GroupKFold(n_splits=k).split(base, groups=shuffled):
        y_train = np.concatenate([yb[train], yc[train]])
        if len(np.unique(y_train)) < 2:
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
        clf.fit(np.concatenate([base[train], cf[train]]), y_train)
        correct_b[test] = clf.predict(base[test]) == yb[test]
        correct_c[test] = clf.predict(cf[test]) == yc[test]
    held = ~np.isnan(correct_b)
    if not held.any():
        return _empty(n, "no fold had two prompts to train on", len(uniq), len(classes))
    pair = np.where(held, correct_b * correct_c, np.nan)
    return PromptDecoding(
        pair_correct=pair,
        pair_accuracy=float(np.nanmean(pair)),
        state_accuracy=float(np.mean(np.concatenate([correct_b[held], correct_c[held]]))),
        chance=1.0 / len(classes) ** 2,
        n_pairs=int(held.sum()),
        n_groups=len(uniq),
        n_classes=len(classes),
        n_splits=k,
    )
