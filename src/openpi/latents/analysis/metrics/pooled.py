"""Compute functions of the pooled metrics (``Metric(scope="pooled")`` entries of the registry).

Each takes one :class:`~openpi.latents.analysis.metrics.pooled_rows.PooledLayer` and returns a
:class:`~openpi.latents.analysis.metrics.pooled_rows.PooledValue` (or None: nothing for this stream).
Definitions: the registry entries, :mod:`~openpi.latents.analysis.measures.geometry` and
:mod:`~openpi.latents.analysis.measures.token_probe`.
"""

from __future__ import annotations

import numpy as np

from openpi.latents.analysis.measures import geometry as G
from openpi.latents.analysis.measures import token_probe as TP
from openpi.latents.analysis.metrics.pooled_rows import PooledLayer, PooledValue

NAN = float("nan")


def _rows(n: int, limit: int, seed: int) -> np.ndarray:
    """A fixed subset of ``limit`` row indices out of ``n`` (all when n <= limit), the same for every layer."""
    return np.arange(n) if n <= limit else np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def token_probe(p: PooledLayer) -> PooledValue | None:
    """Held-out token-identity probe with the slot control task (:func:`token_probe.token_identity_probe`)."""
    if p.token is None:
        return None
    s = p.settings
    r = TP.token_identity_probe(
        p.x, p.token, p.groups(), p.slot, n_splits=s["probe_splits"], control=s["token_probe_control"], seed=s["seed"]
    )
    extra = {
        "control_accuracy": r.control_accuracy,
        "selectivity": r.selectivity,
        "majority": r.majority,
        "coverage": r.coverage,
        "n_rows": r.n_rows,
        "n_groups": r.n_groups,
        "n_classes": r.n_classes,
        "n_splits": r.n_splits,
    }
    return PooledValue(r.accuracy, extra, r.reason)


def tuned_lens(p: PooledLayer) -> PooledValue | None:
    """Held-out tuned-lens top-1 (:func:`token_probe.tuned_lens`) beside the plain logit lens on the same rows."""
    if p.token is None or p.embedding is None or p.final is None:
        return None
    s, emb = p.settings, p.embedding
    if "final_top1" not in p.carry:  # the reference: the target itself read through the unembedding
        keep = _rows(len(p.final), s["lens_eval_rows"], s["seed"])
        h = p.final[keep] if p.final_normed else TP.final_rms_norm(p.final[keep], emb.final_norm_scale)
        p.carry["final_top1"] = float((TP.vocab_scores(h, p.token[keep], emb.embedding)[1] == 0).mean())
    r = TP.tuned_lens(
        p.x,
        p.final,
        p.token,
        p.groups(),
        emb.embedding,
        emb.final_norm_scale,
        target_normed=p.final_normed,
        n_splits=s["probe_splits"],
        max_eval_rows=s["lens_eval_rows"],
        seed=s["seed"],
    )
    extra = {
        "logit_lens_top1": r.logit_top1,
        "mean_rank": r.mean_rank,
        "logit_lens_rank": r.logit_rank,
        "nll": r.nll,
        "translator_r2": r.translator_r2,
        "final_top1": p.carry["final_top1"],
        "target": "text_only_final_norm (after the final norm)" if p.final_normed else "last stored layer",
        "n_rows": r.n_rows,
        "n_groups": r.n_groups,
        "n_splits": r.n_splits,
    }
    return PooledValue(r.top1, extra, r.reason)


def effective_rank(p: PooledLayer) -> PooledValue:
    """exp(entropy) of the normalised singular values of the centred rows (:func:`geometry.effective_rank`)."""
    if len(p.x) < 2:
        return PooledValue(NAN, reason="fewer than two rows")
    return PooledValue(G.effective_rank(p.x), {"n_rows": len(p.x), "bound": min(p.x.shape)})


def cka_layers(p: PooledLayer) -> PooledValue:
    """Debiased linear CKA of this layer's rows with every earlier stored layer's (the same rows); value: with the
    previous layer."""
    s = p.settings
    keep = _rows(len(p.x), s["cka_rows"], s["seed"])
    if len(keep) < 4:
        return PooledValue(NAN, reason="CKA needs four rows or more")
    grams = p.carry.setdefault("cka_grams", [])
    grams.append(G.gram(p.x[keep]))
    row = [G.cka_from_grams(grams[-1], g) for g in grams]
    value = row[-2] if len(row) > 1 else NAN
    return PooledValue(value, {"row": row, "n_rows": len(keep)}, None if len(row) > 1 else "first stored layer")


def inference_gram(p: PooledLayer) -> G.Gram | None:
    """The per-inference gram of this layer (the task probe's features, at most ``cka_rows`` inferences)."""
    keep = _rows(len(p.per_inference), p.settings["cka_rows"], p.settings["seed"])
    return G.gram(p.per_inference[keep]) if len(keep) >= 4 else None


def cka_experts(p: PooledLayer) -> PooledValue | None:
    """Per sampled inference (the task probe's features): debiased linear CKA of expert 1 at this stored layer with
    expert 0's image stream (value: the same layer) and text stream at every stored layer (``p.shared``: their
    per-inference grams, left there by :func:`pooled.analyze_pooled`)."""
    g = inference_gram(p)
    if g is None:
        return PooledValue(NAN, reason="CKA needs four sampled inferences or more")
    extra: dict = {"n_inferences": g.n}
    for other, label in (("expert_0", "image"), ("text_only", "text")):
        if p.shared.get(other):
            extra[f"row_{label}"] = [G.cka_from_grams(g, h) for h in p.shared[other]]
    same = extra.get("row_image") or extra.get("row_text")
    if not same:
        return PooledValue(NAN, extra, "expert 0 not captured")
    value = same[p.layer] if p.layer < len(same) else NAN
    return PooledValue(value, extra | {"value_vs": "image" if "row_image" in extra else "text"})


def cka_denoise(p: PooledLayer) -> PooledValue | None:
    """Debiased linear CKA between the captured denoising steps of expert 1 (suffix tokens 1:); value: first vs last
    captured step; ``matrix`` [S, S]."""
    if p.per_step is None:
        return None
    n_s = p.per_step.shape[0]
    keep = _rows(p.per_step.shape[1], p.settings["cka_rows"], p.settings["seed"])
    if n_s < 2 or len(keep) < 4:
        return PooledValue(NAN, reason="needs two captured denoising steps and four rows")
    grams = [G.gram(p.per_step[k][keep]) for k in range(n_s)]
    mat = [[G.cka_from_grams(a, b) for b in grams] for a in grams]
    return PooledValue(mat[0][-1], {"matrix": mat, "n_rows": len(keep)})
