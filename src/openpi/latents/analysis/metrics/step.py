"""Compute functions of the per-step metrics (``Metric(scope="block" | "episode")`` entries of the registry).

Each takes one :class:`~openpi.latents.analysis.metrics.registry.LayerBlock` and returns ``(rows, values)`` or None (see
:mod:`~openpi.latents.analysis.metrics.registry`, which lists them with their definitions). Shared work (text
reconstruction feeds two metrics, the logit lens three) is computed once per block through :meth:`LayerBlock.cached`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from openpi.latents import schema
from openpi.latents.analysis import measures as M
from openpi.latents.analysis.data import streams as S
from openpi.latents.analysis.measures import attention as ATT

if TYPE_CHECKING:
    from openpi.latents.analysis.metrics.registry import LayerBlock, Values


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


EXPERT1_SENSITIVITY_NOTE = (
    "expert_1: the teacher-forced rerun (cf_tf_*, fed the baseline's x_t) over every captured denoising step where "
    "collected, else the free-running rerun at denoising step 0 only (both runs start from the same noise there); "
    "after step 0 the free-running runs carry different x_t, whose divergence alone reads as sensitivity even at "
    "layer 0 (per-step view: prompt_sensitivity_by_denoise_step)"
)


def _expert1_rerun(b: LayerBlock) -> tuple[str, slice] | None:
    """(stored key, denoising-step columns) of the expert-1 rerun that differs from the baseline by the prompt alone;
    None (reason in ``res.missing``) when the collection has none."""
    tf_key = schema.teacher_forced(b.stream.key)
    if tf_key in b.fields:
        return tf_key, slice(None)
    denoise = b.res.source.get("denoise_steps") or {}
    ids = denoise.get("ids") or []
    if denoise.get("kind") == "model" and ids and int(ids[0]) == 0:
        return b.stream.cf_key, slice(0, 1)
    if denoise.get("kind") != "model" and "denoise_times" in b.fields and b.steps:
        # Steps labelled by capture position: the first captured one is step 0 when its time is t = 1.
        if np.isclose(float(np.ravel(b.read("denoise_times", steps=b.steps[:1]))[0]), 1.0):
            return b.stream.cf_key, slice(0, 1)
    b.res.missing["expert_1.prompt_sensitivity"] = (
        "the collection has no teacher-forced rerun (collect with --counterfactual-teacher-forced) and denoising step "
        f"0 is not among the captured steps ({denoise.get('kind')} ids {list(ids)}): later free-running steps would "
        "measure trajectory divergence, not the prompt"
    )
    return None


def prompt_sensitivity(b: LayerBlock) -> Values | None:
    """‖a − b‖/‖a‖ at the block's steps that have a counterfactual rerun (expert_1: see EXPERT1_SENSITIVITY_NOTE)."""
    if not b.stream.has_cf:
        return None
    key, cols = b.stream.cf_key, slice(None)
    if b.stream.name == "expert_1":
        rerun = _expert1_rerun(b)
        if rerun is None:
            return None
        key, cols = rerun
    if "cf_steps" not in b.carry:
        ep = b.episode
        b.carry["cf_steps"] = set(b.source.present_steps(ep.task_id, ep.episode, key))
    sel = [i for i, s in enumerate(b.steps) if s in b.carry["cf_steps"]]
    if not sel:
        return None
    steps = [b.steps[i] for i in sel]
    cf = S.states(b.stream, b.read(key, steps=steps, layer=b.layer))
    if b.stream.name == "expert_1":  # [steps, denoising steps, B, Ts, W]
        return steps, M.prompt_sensitivity(b.x[sel][:, cols], cf[:, cols], keep_axes=0)
    return steps, M.prompt_sensitivity(b.x[sel], cf, mask=_cf_mask(b, sel, steps, cf), keep_axes=0)


_ATTENTION_COUNTS = "attention_key_counts"
_OLD_STORE = (
    "(the store was written before the capture separated BOS and the trailing newline from the text and counted the "
    "visible keys): rerun the collection; include_constant_tokens=True reads the mass on every valid text key"
)


def _attention(b: LayerBlock) -> dict[str, np.ndarray] | None:
    """{"text", "normalised", "bos"}: per rollout step of the episode (one layer), the mean attention mass on the text
    content keys (every valid text key with ``include_constant_tokens``), that mass normalised by the text share of
    the visible keys, and the mass on BOS; a name is absent (its reason in ``res.missing``) where the store lacks a
    key. Accumulates the summaries behind ``CollectionAnalysis.attention`` once per episode and layer."""
    if not b.stream.attention or "attention_to_text" not in b.fields:
        for metric in ATTENTION_METRICS.values():
            b.res.missing[f"expert_1.{metric}"] = "attention not captured (CaptureSpec.attention_to_text=False)"
        return None
    return b.cached("attention", lambda: _read_attention(b))


def _read_attention(b: LayerBlock) -> dict[str, np.ndarray]:
    res, j = b.res, b.layer
    content = not res.settings.get("include_constant_tokens", False)
    key, group = ("attention_to_text_content", "text_content") if content else ("attention_to_text", "text")
    needs = {"text": (key,), "normalised": (key, _ATTENTION_COUNTS), "bos": ("attention_to_bos",)}
    series: dict[str, np.ndarray] = {}
    for name, keys in needs.items():
        lacking = [k for k in keys if k not in b.fields]
        if lacking:
            res.missing[f"expert_1.{ATTENTION_METRICS[name]}"] = f"no {', '.join(lacking)} in the store {_OLD_STORE}"
        elif name == "normalised":  # counts [steps, B, heads, Ts, 4]: the same at every denoising step
            series[name] = ATT.normalised_mass(series["text"], b.read(_ATTENTION_COUNTS, layer=j)[:, None], group)
        else:
            series[name] = b.read(keys[0], layer=j)  # every rollout step: [steps, S, B, heads, Ts]
    out = {}
    for name, values in series.items():
        per_step = []
        for i in range(len(values)):
            summary = ATT.attention_to_language(values[i][:, None], state_query=b.stream.state_query)
            per_step.append(summary.overall)
            _accumulate(res, name, j, b.stream.n_layers, summary)
        out[name] = np.asarray(per_step)
    if series and "denoise_times" not in res.attention:
        n_s = next(iter(series.values())).shape[1]
        res.attention["denoise_times"] = np.asarray(b.read("denoise_times", steps=[0])[0])
        ids = (res.source.get("denoise_steps") or {}).get("ids")
        res.attention["denoise_steps"] = np.asarray(ids if ids and len(ids) == n_s else range(n_s))
    return out


def _accumulate(res, name: str, j: int, n_layers: int, s: ATT.AttentionToLanguage) -> None:
    """Adds one rollout step's summary of layer ``j`` to the NaN-aware sums ``res.attention[f"{part}:{name}"]`` (and
    their counts under ``"n:" + ...``): part "actions" [S, L], "state" [L], "heads" [L, heads]; and keeps the largest
    state-query deviation across denoising steps."""
    for part, value in (("actions", s.actions[:, 0]), ("state", s.state[0]), ("heads", s.per_head[0])):
        value = np.asarray(value, np.float64)
        k = f"{part}:{name}"
        if k not in res.attention:
            shape = (len(value), n_layers) if part == "actions" else (n_layers, *value.shape)
            res.attention[k], res.attention["n:" + k] = np.zeros(shape), np.zeros(shape)
        ok = ~np.isnan(value)
        idx = (slice(None), j) if part == "actions" else j
        res.attention[k][idx] += np.where(ok, value, 0.0)
        res.attention["n:" + k][idx] += ok
    if not np.isnan(s.state_step_spread):
        k = f"state_step_spread:{name}"
        res.attention[k] = max(float(res.attention.get(k, 0.0)), s.state_step_spread)


def _attention_field(name: str) -> Callable[[LayerBlock], Values | None]:
    def compute(b: LayerBlock) -> Values | None:
        out = _attention(b)
        return None if out is None or name not in out else (slice(None), out[name])

    compute.__name__ = ATTENTION_METRICS[name]
    return compute


# The attention metrics of the registry, by the series they read.
ATTENTION_METRICS = {
    "text": "attention_to_text",
    "normalised": "attention_to_text_normalised",
    "bos": "attention_to_bos",
}
attention_to_text = _attention_field("text")
attention_to_text_normalised = _attention_field("normalised")
attention_to_bos = _attention_field("bos")


# The text-decoding metrics: fields of one text reconstruction / logit lens per block.
language_loss = _field_of(_text_reconstruction, "language_loss")
text_accuracy = _field_of(_text_reconstruction, "accuracy")
logit_nll = _field_of(_logit_lens, "mean_nll")
logit_rank = _field_of(_logit_lens, "mean_rank")
logit_top1 = _field_of(_logit_lens, "top1")
