"""Attention to language: definitions over the captured expert-1 attention (pure numpy).

What a collection stores per inference (``openpi.models.sampling``; :data:`openpi.latents.schema.ATTENTION_KEYS`):
for denoising step s, layer l, batch row b, head h and expert-1 query q, the softmax mass ``m`` on a key group —
every valid text key (``attention_to_text``), the text *content* keys (``attention_to_text_content``: the valid text
keys without the first and the last, i.e. BOS and pi0's trailing ``"\\n"``, which are the same for every prompt) and
BOS alone (``attention_to_bos``) — and ``attention_key_counts`` [L, B, heads, Ts, 4]: how many keys q may attend to
("visible": the attention mask after any knockout) and how many of them are in each group
(:data:`~openpi.latents.schema.ATTENTION_COUNT_GROUPS`).

Definitions:

* **mass** ``m`` ∈ [0, 1]: the summed softmax probability on the group's keys.
* **share** of group g (:func:`key_share`): ``c_g / c_visible`` for that query, layer and head (knockouts may differ by
  layer and head) — the mass uniform attention over the visible keys would give the group.
* **normalised mass** (:func:`normalised_mass`): ``m / share``: 1 = the group gets what uniform attention would give
  it, > 1 = more; NaN where the query sees no key of the group (the content of a blank prompt, a knocked-out group).
* Summaries (:func:`attention_to_language`): per layer, the mean over denoising steps, batch rows, heads and queries;
  per head, the same without the mean over heads; per denoising step, the action queries only.
* Query roles: pi0's suffix token 0 is the **state token**. It attends only to the prefix and to itself, and its
  input does not depend on the denoising time or x_t, so its attention is identical at every denoising step by
  construction: it is reported once (at the first captured step), with the largest deviation across the captured
  steps as a check (0 expected). pi0.5 has no state token: every expert-1 query is an action token.

Means skip NaN (a query with no visible key of the group); an all-NaN mean is NaN.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from openpi.latents.schema import ATTENTION_COUNT_GROUPS


def key_share(counts, group: str) -> np.ndarray:
    """``counts[..., group] / counts[..., "visible"]`` (float64) from ``attention_key_counts`` [..., 4]; NaN where the
    query sees no key at all."""
    c = np.asarray(counts, np.float64)
    if c.shape[-1] != len(ATTENTION_COUNT_GROUPS):
        raise ValueError(f"attention_key_counts must end in {len(ATTENTION_COUNT_GROUPS)} groups, got {c.shape}")
    g = ATTENTION_COUNT_GROUPS.index(group)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c[..., 0] > 0, c[..., g] / np.where(c[..., 0] > 0, c[..., 0], 1.0), np.nan)


def normalised_mass(mass, counts, group: str) -> np.ndarray:
    """``mass / key_share(counts, group)`` (float64): 1 for uniform attention over the visible keys, NaN where the query
    sees no key of ``group``. ``mass`` [S, L, B, heads, Ts] (or [S, ...] with any axes ``counts`` [..., 4] broadcasts
    against), one denoising-step axis in front of the counts' axes."""
    share = key_share(counts, group)
    m = np.asarray(mass, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(share > 0, m / np.where(share > 0, share, 1.0), np.nan)


@dataclasses.dataclass(frozen=True)
class AttentionToLanguage:
    """Result of :func:`attention_to_language` (of a mass or a normalised mass) [S, L, B, heads, Ts].

    Attributes:
        per_layer: [L] mean over denoising steps, batch, heads and every query.
        per_head: [L, heads] mean over denoising steps, batch and every query.
        actions: [S, L] the action-token queries (pi0: queries 1:, pi0.5: all), mean over batch and heads.
        state: [L] pi0's state-token query (query 0) at the first captured denoising step, mean over batch and heads;
            NaN without a state token (pi0.5).
        state_step_spread: max |value(step s) − value(first step)| of the state query over captured steps, batch,
            heads and layers: 0 by construction (NaN without a state token or with one captured step).
        overall: mean of ``per_layer``.
    """

    per_layer: np.ndarray
    per_head: np.ndarray
    actions: np.ndarray
    state: np.ndarray
    state_step_spread: float
    overall: float


def _nanmean(x: np.ndarray, axis) -> np.ndarray:
    ok = ~np.isnan(x)
    n = ok.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, x, 0.0).sum(axis=axis) / np.maximum(n, 1), np.nan)


def attention_to_language(values, *, state_query: bool = True) -> AttentionToLanguage:
    """Summarise ``values`` [S, L, B, heads, Ts] (masses or normalised masses of each expert-1 query).

    ``state_query``: query 0 is pi0's state token (False for pi0.5, which has none). The S axis holds the captured
    denoising steps in capture order (step 0 is t = 1.0). To pool several inferences, concatenate them along B.
    """
    a = np.asarray(values, np.float64)
    if a.ndim != 5:
        raise ValueError(f"expected [S, L, B, heads, Ts], got shape {a.shape}")
    per_layer = _nanmean(a, axis=(0, 2, 3, 4))
    actions = a[..., 1:] if state_query else a
    nan_l = np.full(a.shape[1], np.nan)
    spread = float("nan")
    if state_query and a.shape[0] > 1:
        d = np.abs(a[1:, ..., 0] - a[:1, ..., 0])
        spread = float(np.nanmax(d)) if np.any(~np.isnan(d)) else float("nan")
    return AttentionToLanguage(
        per_layer=per_layer,
        per_head=_nanmean(a, axis=(0, 2, 4)),
        actions=_nanmean(actions, axis=(2, 3, 4)) if actions.shape[-1] else np.full(a.shape[:2], np.nan),
        state=_nanmean(a[0, ..., 0], axis=(1, 2)) if state_query else nan_l,
        state_step_spread=spread,
        overall=float(_nanmean(per_layer, axis=0)),
    )
