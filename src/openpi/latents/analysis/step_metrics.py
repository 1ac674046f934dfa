"""Compute functions of the per-step metrics (``Metric(scope="block" | "episode")`` entries of the registry).

Each takes one :class:`~openpi.latents.analysis.registry.LayerBlock` and returns ``(rows, values)`` or None (see
:mod:`~openpi.latents.analysis.registry`, which lists them with their definitions). Shared work (text reconstruction
feeds two metrics, the logit lens three) is computed once per block through :meth:`LayerBlock.cached`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from openpi.latents import schema
from openpi.latents.analysis import metrics as M
from openpi.latents.analysis import streams as S

if TYPE_CHECKING:
    from openpi.latents.analysis.registry import LayerBlock, Values


def _decoded_rows(b: LayerBlock) -> list[int]:
    """Positions in the block of the rollout steps text decoding reads (every ``text_step_stride``-th)."""
    stride = b.res.settings["text_step_stride"]
    return [i for i, s in enumerate(b.steps) if s % stride == 0]


def _text_inputs(b: LayerBlock):
    def read():
        dec = _decoded_rows(b)
        rows = [b.steps[i] for i in dec]
        mask = b.mask[dec]
        if not b.res.settings.get("include_constant_tokens", False):
            mask = M.informative_text_mask(mask)  # BOS and the trailing "\n" are the same for every prompt
        return rows, b.x[dec], b.read("tokenized_prompt", steps=rows), mask

    return b.cached("text_inputs", read)


def _text_reconstruction(b: LayerBlock) -> tuple[list[int], M.TextReconstruction] | None:
    rows, xs, ids, ms = _text_inputs(b)
    if not rows:
        return None
    return rows, b.cached("tr", lambda: M.text_reconstruction(xs, ids, ms, b.embedding.embedding, keep_axes=0))


def _logit_lens(b: LayerBlock) -> tuple[list[int], M.LogitLens] | None:
    rows, xs, ids, ms = _text_inputs(b)
    if not rows:
        return None
    emb = b.embedding
    return rows, b.cached("ll", lambda: M.logit_lens(xs, ids, ms, emb.embedding, emb.final_norm_scale, keep_axes=0))


def _field_of(result_fn: Callable, attr: str) -> Callable[[LayerBlock], Values | None]:
    def compute(b: LayerBlock) -> Values | None:
        out = result_fn(b)
        return None if out is None else (out[0], getattr(out[1], attr))

    compute.__name__ = f"{attr}_of_{result_fn.__name__.lstrip('_')}"
    return compute


def drift(b: LayerBlock) -> Values:
    """1 − cos to the episode's first rollout step (expert_1: at the last captured denoising step)."""
    xd = b.x[:, -1] if b.stream.name == "expert_1" else b.x
    if "x0" not in b.carry:
        b.carry["x0"], b.carry["m0"] = xd[:1], None if b.mask is None else b.mask[:1]
    both = np.concatenate([b.carry["x0"], xd])
    bm = None if b.mask is None else np.concatenate([b.carry["m0"], b.mask])
    return b.steps, M.rollout_drift(both, mask=bm)[1:]


def drift_states(stream: S.Stream, x: np.ndarray) -> np.ndarray:
    """The states drift compares: expert_1 at the last captured denoising step, the others as read."""
    return x[:, -1] if stream.name == "expert_1" else x


def centred_drift(b: LayerBlock) -> Values | None:
    """Per-position 1 − cos after subtracting the layer's collection mean, to the episode's first rollout step."""
    if b.layer_mean is None:
        return None
    xd = drift_states(b.stream, b.x)
    if "cx0" not in b.carry:
        b.carry["cx0"], b.carry["cm0"] = xd[:1], None if b.mask is None else b.mask[:1]
    both = np.concatenate([b.carry["cx0"], xd])
    bm = None if b.mask is None else np.concatenate([b.carry["cm0"], b.mask])
    return b.steps, M.centred_drift(both, b.layer_mean, mask=bm)[1:]


def _cf_mask(b: LayerBlock, sel: list[int], steps: list[int], cf_states: np.ndarray) -> np.ndarray | None:
    """Positions compared under both prompts: text_only, valid under both holding the same token; expert_0, the
    image positions of cameras valid in both runs."""
    cm = None if b.mask is None else b.mask[sel]
    if b.stream.name == "text_only":
        same = b.read("tokenized_prompt", steps=steps) == b.read(schema.counterfactual("tokenized_prompt"), steps=steps)
        cm = cm & b.read(schema.counterfactual("text_mask"), steps=steps).astype(bool) & same
        if b.layer == 0:
            b.res.cf_text_positions += [int(c) for c in cm.reshape(len(steps), -1).sum(-1)]
    elif b.stream.name == "expert_0" and cm is not None and schema.counterfactual("segment_mask") in b.fields:
        seg = b.read(schema.counterfactual("segment_mask"), steps=steps)
        cm = cm & S.position_mask(b.stream, S.camera_valid(b.stream, seg, cf_states.shape[:2]))
    return cm


def prompt_sensitivity(b: LayerBlock) -> Values | None:
    """‖a − b‖/‖a‖ at the block's steps that have a counterfactual rerun."""
    if not b.stream.has_cf:
        return None
    if "cf_steps" not in b.carry:
        ep = b.episode
        b.carry["cf_steps"] = set(b.source.present_steps(ep.task_id, ep.episode, b.stream.cf_key))
    sel = [i for i, s in enumerate(b.steps) if s in b.carry["cf_steps"]]
    if not sel:
        return None
    steps = [b.steps[i] for i in sel]
    cf = S.states(b.stream, b.read(b.stream.cf_key, steps=steps, layer=b.layer))
    return steps, M.prompt_sensitivity(b.x[sel], cf, mask=_cf_mask(b, sel, steps, cf), keep_axes=0)


def attention_to_text(b: LayerBlock) -> Values | None:
    """Mean attention mass of expert-1 queries on the valid text keys per rollout step; also accumulates the
    [S, L] sums (all queries / state query / action queries) behind ``CollectionAnalysis.attention``."""
    if not b.stream.attention or "attention_to_text" not in b.fields:
        return None
    res, j, n_layers = b.res, b.layer, b.stream.n_layers
    a = b.read("attention_to_text", layer=j)  # every rollout step: [steps, S, B, heads, Ts]
    per_step = []
    for i in range(len(a)):
        summary = M.attention_to_language(a[i][:, None])  # [S, 1, B, heads, Ts]
        per_step.append(summary.overall)
        for name, value in (
            ("all", summary.per_step_layer),
            ("state", summary.state_token),
            ("actions", summary.action_tokens),
        ):
            res.attention.setdefault(name, np.zeros((a.shape[1], n_layers)))[:, j] += value[:, 0]
        res.attention.setdefault("count", np.zeros((a.shape[1], n_layers)))[:, j] += 1
    if "denoise_times" not in res.attention:
        res.attention["denoise_times"] = np.asarray(b.read("denoise_times", steps=[0])[0])
        ids = (res.source.get("denoise_steps") or {}).get("ids")
        res.attention["denoise_steps"] = np.asarray(ids if ids and len(ids) == a.shape[1] else range(a.shape[1]))
    return slice(None), np.asarray(per_step)


# The text-decoding metrics: fields of one text reconstruction / logit lens per block.
language_loss = _field_of(_text_reconstruction, "language_loss")
text_accuracy = _field_of(_text_reconstruction, "accuracy")
logit_nll = _field_of(_logit_lens, "mean_nll")
logit_rank = _field_of(_logit_lens, "mean_rank")
logit_top1 = _field_of(_logit_lens, "top1")
