"""Matched-observation prompt decoding: which prompt was given, decoded from states whose observation is held fixed.

A counterfactual rerun computes the same observation (and noise) under a second prompt. Each observation i so gives
two states, ``base[i]`` under its prompt and ``cf[i]`` under the counterfactual prompt. A linear classifier
(:func:`ridge_classifier`) is trained to name the prompt of a state (labels: the prompt strings) on the pairs of some
episodes and tested on the pairs of the others (folds grouped by episode, so no observation, nor any other
observation of its episode, is in both).

The score is the **pair accuracy**: the fraction of held-out observations whose two states are BOTH decoded to their
own prompts. The scene cannot answer this: a state that depends on the observation only is the same under both
prompts, gets the same prediction twice, and so is right on at most one of the two, a pair accuracy of exactly 0.
Guessing among K prompts independently scores 1/K² (``chance``). The per-state accuracy is reported beside it (a
scene-only state can reach 0.5 there when the scene tells the task apart).

The rerun's prompt must not be a function of the scene: with the next task's prompt (or a blank one) as the rerun of
every episode of a task, a state carrying only a scene-specific "not my instruction" shift names both prompts (pair
accuracy 0.975; a shared "prompt present" bit with blank reruns: 1.000). So :func:`decode_layer` (the collection's
reading) refuses blank reruns, needs at least two distinct rerun prompts per task (the collection draws the other
task at random per episode; a task with fewer is left out, named in the reason, and with fewer than two tasks left
the decoding is NaN) and reports the **scene-aware chance** ``scene_chance``: the pair accuracy of a decoder that
knows the scene (so the task and its own prompt) but not the rerun's content, i.e. the mean over pairs of the
largest share of one rerun prompt among its task's pairs. Content-free states read at ``scene_chance``.

The decoder is pure numpy (a closed-form ridge classifier: deterministic, no iterative solver);
:func:`decode_layer` reads one layer of a collection for the metric registry.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from openpi.latents import schema
from openpi.latents.analysis.data import streams as S


@dataclasses.dataclass(frozen=True)
class PromptDecoding:
    """Held-out matched-observation prompt decoding (see the module docstring); NaN with `reason` when undefined."""

    pair_correct: np.ndarray | None  # [N] 1.0 / 0.0 per observation (NaN: not held out in any fold)
    pair_accuracy: float  # mean of pair_correct
    state_accuracy: float  # fraction of held-out states (2 per observation) decoded to their own prompt
    chance: float  # 1 / K² for K prompts (independent uniform guesses)
    n_pairs: int
    n_groups: int
    n_classes: int
    n_splits: int
    reason: str | None = None
    scene_chance: float = float("nan")  # a scene-aware, content-blind decoder's pair accuracy (decode_layer)


def _empty(n: int, reason: str, n_groups: int = 0, n_classes: int = 0) -> PromptDecoding:
    nan = float("nan")
    return PromptDecoding(np.full(n, np.nan), nan, nan, nan, n, n_groups, n_classes, 0, reason)


def ridge_classifier(x_train: np.ndarray, y_train: np.ndarray, alpha: float = 1.0):
    """A linear classifier in closed form: features standardised on the training rows, ridge regression
    (``alpha``·I) onto the centred one-hot labels, prediction = the class of the largest output. Solved in the dual
    when there are fewer rows than features. Returns ``predict(x) -> labels``."""
    classes, y_idx = np.unique(y_train, return_inverse=True)
    mu, sd = x_train.mean(0), x_train.std(0)
    sd = np.where(sd > 0, sd, 1.0)  # constant features stay 0 after centring
    z = (x_train - mu) / sd
    onehot = np.eye(len(classes))[y_idx]
    target = onehot - onehot.mean(0)
    n, d = z.shape
    if n < d:
        w = z.T @ np.linalg.solve(z @ z.T + alpha * np.eye(n), target)
    else:
        w = np.linalg.solve(z.T @ z + alpha * np.eye(d), z.T @ target)
    bias = onehot.mean(0)

    def predict(x: np.ndarray) -> np.ndarray:
        return classes[np.argmax(((x - mu) / sd) @ w + bias, axis=1)]

    return predict


def matched_prompt_decoding(
    base: np.ndarray,
    cf: np.ndarray,
    base_labels,
    cf_labels,
    groups,
    *,
    n_splits: int = 5,
    seed: int = 0,
    alpha: float = 1.0,
) -> PromptDecoding:
    """Decodes the prompt from matched states (see the module docstring).

    Args:
        base, cf: [N, d] features of observation i under its prompt and under the counterfactual prompt.
        base_labels, cf_labels: [N] the two prompts of each observation (any hashable; equal labels are an error).
        groups: [N] group of each observation (the episode): folds never split a group.
        n_splits: folds (reduced to the number of groups when there are fewer, at least 2); groups are dealt to folds
            round-robin in an order drawn from `seed`.
        alpha: ridge penalty of :func:`ridge_classifier` (trained on both states of every training observation).
    """
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
    fold_of_group = np.empty(len(uniq), int)
    fold_of_group[np.random.default_rng(seed).permutation(len(uniq))] = np.arange(len(uniq)) % k
    fold = fold_of_group[np.searchsorted(uniq, g)]
    correct_b, correct_c = np.full(n, np.nan), np.full(n, np.nan)
    for f in range(k):
        train, test = fold != f, fold == f
        y_train = np.concatenate([yb[train], yc[train]])
        if len(np.unique(y_train)) < 2:
            continue
        predict = ridge_classifier(np.concatenate([base[train], cf[train]]), y_train, alpha)
        correct_b[test] = predict(base[test]) == yb[test]
        correct_c[test] = predict(cf[test]) == yc[test]
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


# --------------------------------------------------------------------------------------------------------------------
# Reading a collection (the registry's prompt_decoding)


def _decoding_features(b: Any, ep, steps: list[int], key: str, seg_key: str) -> np.ndarray:
    """Probe features of ``key`` (base or cf states) at ``steps`` of episode ``ep``: expert_0, the per-camera means of
    the valid cameras; expert_1, state token and mean action token at the first captured denoising step (where both
    runs start from the same noise, so only the prompt differs)."""
    st = b.stream
    x = S.states(st, b.source.read(ep.task_id, ep.episode, key, layer=b.layer, steps=steps))
    if st.name == "expert_1":
        return S.probe_features(st, x[:, :1])
    fields = b.source.fields(ep.task_id, ep.episode)
    seg = b.source.read(ep.task_id, ep.episode, seg_key, steps=steps) if seg_key in fields else None
    return S.probe_features(st, x, None, S.camera_valid(st, seg, x.shape[:2]))


def _prompt_labels(b: Any, ep, steps: list[int], cf: bool) -> list:
    """The prompt of each step: the episode's prompt attributes when both are recorded, else the per-step ``prompt``
    / ``cf_prompt`` strings, else the valid token ids the model saw (``tokenized_prompt`` / ``text_mask``)."""
    if ep.prompt is not None and ep.counterfactual_prompt is not None:
        return [ep.counterfactual_prompt if cf else ep.prompt] * len(steps)
    fields = b.source.fields(ep.task_id, ep.episode)
    read = functools.partial(b.source.read, ep.task_id, ep.episode, steps=steps)
    name = schema.counterfactual if cf else (lambda k: k)
    if name("prompt") in fields:
        return [str(p) for p in np.asarray(read(name("prompt"))).reshape(-1)]
    if name("tokenized_prompt") in fields and name("text_mask") in fields:
        ids = read(name("tokenized_prompt")).reshape(len(steps), -1)
        mask = read(name("text_mask")).astype(bool).reshape(len(steps), -1)
        return [" ".join(map(str, i[m])) for i, m in zip(ids, mask)]
    return [None] * len(steps)


BLANK_REFUSAL = (
    "the reruns are blank: a single shared 'prompt present' bit decodes them perfectly (1.000), whatever the prompt "
    "says; collect with --counterfactual other-task (drawn at random per episode)"
)


def _usable_pairs(tasks: list[int], labels: list, cf_labels: list) -> tuple[np.ndarray, str | None, float]:
    """(keep mask over pairs, reason when something is left out or nothing is usable, scene-aware chance)."""
    tasks_a, cf = np.asarray(tasks), np.asarray(cf_labels, dtype=object)
    keep = cf != ""
    if not keep.any():
        return keep, BLANK_REFUSAL, float("nan")
    thin = [int(t) for t in np.unique(tasks_a[keep]) if len(set(cf[keep & (tasks_a == t)])) < 2]
    keep &= ~np.isin(tasks_a, thin)
    reason = None
    if thin:
        reason = (
            f"task(s) {thin} have a single rerun prompt, so the scene names it (with the next task's prompt a "
            "scene-only 'not my instruction' shift decodes at 0.975): left out; collect with --counterfactual "
            "other-task, which draws the other task at random per episode"
        )
    if len(np.unique(tasks_a[keep])) < 2:
        return keep & False, reason or "fewer than two tasks with two distinct rerun prompts", float("nan")
    share = []
    for t in tasks_a[keep]:
        _, counts = np.unique(cf[keep & (tasks_a == t)].astype(str), return_counts=True)
        share.append(counts.max() / counts.sum())
    return keep, reason, float(np.mean(share))


def decode_layer(b: Any) -> dict[int, tuple[list[int], np.ndarray]]:
    """The registry's ``prompt_decoding`` for one layer of one stream: reads the base / counterfactual features of
    every episode (``b`` gives the source, stream and layer), fits the grouped decoder once, and returns each
    episode's (rollout steps, pair-correct values); the fit's :class:`PromptDecoding` (without the per-pair values)
    goes to ``res.shared[("prompt_decoding_summary", stream, layer index)]``."""
    feats, cf_feats, labels, cf_labels, groups, where, tasks = [], [], [], [], [], [], []
    for i, ep in enumerate(b.res.episodes):
        if ep.n_steps == 0:
            continue
        steps = b.source.present_steps(ep.task_id, ep.episode, b.stream.cf_key)
        for start in range(0, len(steps), 16):  # bounded reads
            chunk = steps[start : start + 16]
            f = _decoding_features(b, ep, chunk, b.stream.key, "segment_mask")
            fc = _decoding_features(b, ep, chunk, b.stream.cf_key, schema.counterfactual("segment_mask"))
            rows = len(f) // len(chunk)  # batch rows per step
            yb = np.repeat(_prompt_labels(b, ep, chunk, cf=False), rows)
            yc = np.repeat(_prompt_labels(b, ep, chunk, cf=True), rows)
            keep = np.array([x is not None and y is not None and x != y for x, y in zip(yb, yc)], bool)
            feats.append(f[keep])
            cf_feats.append(fc[keep])
            labels += list(yb[keep])
            cf_labels += list(yc[keep])
            groups += [i] * int(keep.sum())
            tasks += [ep.task_id] * int(keep.sum())
            where += [(i, s) for s, k in zip(np.repeat(chunk, rows), keep) if k]
    if not where:
        b.res.missing[f"{b.stream.name}.prompt_decoding"] = "no rerun with a prompt different from the original"
        return {}
    usable, why, scene_chance = _usable_pairs(tasks, labels, cf_labels)
    if why is not None:
        b.res.missing[f"{b.stream.name}.prompt_decoding"] = why
    if not usable.any():
        return {}
    x, xc = np.concatenate(feats)[usable], np.concatenate(cf_feats)[usable]
    labels, cf_labels = [v for v, k in zip(labels, usable) if k], [v for v, k in zip(cf_labels, usable) if k]
    groups, where = [v for v, k in zip(groups, usable) if k], [v for v, k in zip(where, usable) if k]
    if b.stream.name == "expert_0":  # cameras valid in no row (the masked third camera): constant zero features
        keep = np.any(x != 0, axis=0) | np.any(xc != 0, axis=0)
        x, xc = x[:, keep], xc[:, keep]
    s = b.res.settings
    dec = matched_prompt_decoding(x, xc, labels, cf_labels, groups, n_splits=s["probe_splits"], seed=s["seed"])
    # the fit's summary (chance, counts, per-state accuracy) for callers; per-step values go to the registry
    b.res.shared[("prompt_decoding_summary", b.stream.name, b.layer)] = dataclasses.replace(
        dec, pair_correct=None, scene_chance=scene_chance
    )
    per_step: dict[int, dict[int, list[float]]] = {}
    for (i, step), v in zip(where, dec.pair_correct):
        per_step.setdefault(i, {}).setdefault(step, []).append(v)  # batch rows of one step: their mean
    return {i: (list(d), np.array([np.mean(v) for v in d.values()])) for i, d in per_step.items()}
