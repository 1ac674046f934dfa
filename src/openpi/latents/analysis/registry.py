"""The per-step metrics of the analysis: one compute function each, and :data:`REGISTRY`, the one list of them.

Adding a metric is one function here plus one :class:`Metric` entry in :data:`REGISTRY`: the per-layer driver
(:mod:`openpi.latents.analysis.driver`) calls every entry that applies to a stream, and the report (metrics.json,
tables, figures, definitions) and the openpi-style language-loss view take the list, definitions and labels from here.

A ``"block"`` metric sees one :class:`LayerBlock` (a block of rollout steps of one layer of one stream of one episode,
already read) and returns ``(rows, values)``: the rollout-step indices it has values for and one value per row, or
None when it has nothing for this block. An ``"episode"`` metric is called once per episode and layer (its block
spans every rollout step; ``x`` is None) and reads what it needs itself. Shared work (text reconstruction feeds two
metrics, the logit lens three) is computed once per block through :meth:`LayerBlock.cached`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from openpi.latents import schema
from openpi.latents.analysis import metrics as M
from openpi.latents.analysis import prompt_decoding as PD
from openpi.latents.analysis import streams as S

if TYPE_CHECKING:
    from openpi.latents.analysis.embedding import TokenEmbedding
    from openpi.latents.analysis.result import CollectionAnalysis, EpisodeRef

Rows = Sequence[int] | slice
Values = tuple[Rows, np.ndarray]


@dataclasses.dataclass
class LayerBlock:
    """What a metric sees: rollout steps ``steps`` of stored layer ``layer`` of ``stream`` in one episode.

    ``x``: the stream's states [steps, ...] (:func:`streams.states`); ``mask``: its valid positions (text_only: the
    prompt's ``text_mask``; expert_0: the positions of valid cameras; None: all), as the driver read them. ``carry``
    lives across the blocks of one episode and layer (drift keeps the first rollout step there).
    """

    source: Any
    res: CollectionAnalysis
    stream: S.Stream
    ep_index: int
    episode: EpisodeRef
    layer: int
    steps: list[int] | None  # None: every rollout step ("episode" metrics)
    fields: Mapping[str, tuple]
    embedding: TokenEmbedding | None = None
    x: np.ndarray | None = None
    mask: np.ndarray | None = None
    carry: dict[str, Any] = dataclasses.field(default_factory=dict)
    _cache: dict[str, Any] = dataclasses.field(default_factory=dict)

    def read(self, key: str, steps: Sequence[int] | None = None, layer: int | None = None) -> np.ndarray:
        """``key`` at ``steps`` (default: this block's) of this episode, one stored layer if ``layer`` is given."""
        ep = self.episode
        return self.source.read(ep.task_id, ep.episode, key, layer=layer, steps=self.steps if steps is None else steps)

    def cached(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per block (several metrics share one text reconstruction / logit lens)."""
        if name not in self._cache:
            self._cache[name] = compute()
        return self._cache[name]


@dataclasses.dataclass(frozen=True)
class Metric:
    """One per-step metric: where it applies, what it means, how it is computed and shown."""

    name: str
    streams: tuple[str, ...]  # the streams it applies to (NOT_APPLICABLE says why not the others)
    definition: str  # one line: metrics.json "definitions", report.md
    compute: Callable[[LayerBlock], Values | None]
    label: str  # axis label of its figures
    higher_means: str  # what a higher value says (the openpi-style language-loss view)
    scope: str = "block"  # "block": per block of rollout steps; "episode": once per episode and layer
    needs_embedding: bool = False  # skipped (with the reason) without a token embedding
    curves: bool = False  # drawn in the per-layer curves
    heatmaps: bool = False  # drawn as layer × rollout-step heatmaps and split by success
    fraction: bool = False  # a fraction in [0, 1]: figures keep the full scale


# --------------------------------------------------------------------------------------------------------------------
# Compute functions (one per metric)


def _decoded_rows(b: LayerBlock) -> list[int]:
    """Positions in the block of the rollout steps text decoding reads (every ``text_step_stride``-th)."""
    stride = b.res.settings["text_step_stride"]
    return [i for i, s in enumerate(b.steps) if s % stride == 0]


def _text_inputs(b: LayerBlock):
    def read():
        dec = _decoded_rows(b)
        rows = [b.steps[i] for i in dec]
        return rows, b.x[dec], b.read("tokenized_prompt", steps=rows), b.mask[dec]

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


def prompt_decoding(b: LayerBlock) -> Values | None:
    """Per rollout step with a counterfactual rerun: 1 if the held-out decoder names the prompt of both the base and
    the counterfactual state, else 0 (fit once per layer over the collection, cached in ``res.shared``)."""
    if not b.stream.has_cf or b.stream.key is None:
        return None
    key = ("prompt_decoding", b.stream.name, b.layer)
    if key not in b.res.shared:
        b.res.shared[key] = PD.decode_layer(b)
    return b.res.shared[key].get(b.ep_index)


# --------------------------------------------------------------------------------------------------------------------
# The registry

_TEXT = ("text_only",)
_LENS = "same-position logit lens: "

REGISTRY: tuple[Metric, ...] = (
    Metric(
        "language_loss",
        _TEXT,
        "1 − text reconstruction accuracy: fraction of valid prompt positions whose state's nearest token embedding "
        "(cosine) is not the prompt token",
        _field_of(_text_reconstruction, "language_loss"),
        label="language loss (1 − text reconstruction acc.)",
        higher_means="more of the prompt is lost (not decodable)",
        needs_embedding=True,
        curves=True,
        heatmaps=True,
        fraction=True,
    ),
    Metric(
        "text_accuracy",
        _TEXT,
        "text reconstruction accuracy (nearest token embedding by cosine equals the prompt token)",
        _field_of(_text_reconstruction, "accuracy"),
        label="text reconstruction accuracy",
        higher_means="more of the prompt is decodable",
        needs_embedding=True,
        fraction=True,
    ),
    Metric(
        "logit_nll",
        _TEXT,
        _LENS + "−log softmax(E·RMSNorm_final(h))[token], nats",
        _field_of(_logit_lens, "mean_nll"),
        label="logit-lens NLL (nats)",
        higher_means="the prompt token is less likely under the logit lens",
        needs_embedding=True,
        curves=True,
    ),
    Metric(
        "logit_rank",
        _TEXT,
        _LENS + "rank of the prompt token among all vocab logits (0 = top)",
        _field_of(_logit_lens, "mean_rank"),
        label="logit-lens rank",
        higher_means="the prompt token ranks lower under the logit lens",
        needs_embedding=True,
    ),
    Metric(
        "logit_top1",
        _TEXT,
        _LENS + "fraction of positions where the prompt token has the top logit",
        _field_of(_logit_lens, "top1"),
        label="logit-lens top-1",
        higher_means="the prompt token tops the logit lens more often",
        needs_embedding=True,
        fraction=True,
    ),
    Metric(
        "prompt_sensitivity",
        S.STREAMS,
        "‖a − b‖/‖a‖ between the stream under the prompt (a) and the counterfactual prompt (b), same observation and "
        "noise (expert_0: image positions of valid cameras only; text_only: over the positions that hold the same "
        "token under both prompts, which with a blank counterfactual is BOS alone: a one-position measure)",
        prompt_sensitivity,
        label="prompt sensitivity ‖a−b‖/‖a‖",
        higher_means="the prompt changes the stream more (not a loss)",
        curves=True,
        heatmaps=True,
    ),
    Metric(
        "prompt_decoding",
        ("expert_0", "expert_1"),
        "matched-observation prompt decoding: held-out pair accuracy of a linear classifier (ridge on standardised "
        "features onto one-hot prompts, folds grouped by episode) naming the prompt of the state under the prompt and "
        "of the state under the counterfactual prompt of the same observation and noise; 1 when both are right. A "
        "scene-only state scores 0, guessing 1/K² for K prompts. expert_0: per-camera means of valid "
        "cameras; expert_1: state token and mean action token at the first captured denoising step",
        prompt_decoding,
        label="matched-observation prompt decoding (pair acc.)",
        higher_means="the states tell the prompt apart with the observation held fixed (not a loss)",
        scope="episode",
        curves=True,
        fraction=True,
    ),
    Metric(
        "drift",
        S.STREAMS,
        "1 − cos(x_t, x_0) to the first rollout step of the same episode (expert_0: valid cameras only; expert_1: at "
        "the last captured denoising step, the one closest to the action: openpi draws fresh noise at every "
        "inference, so early denoising steps drift by the noise alone)",
        drift,
        label="drift 1 − cos(x_t, x_0)",
        higher_means="the stream moved further from the episode's first rollout step",
        curves=True,
        heatmaps=True,
    ),
    Metric(
        "attention_to_text",
        ("expert_1",),
        "attention mass of expert-1 queries on the valid text keys, mean over denoising steps, heads and queries",
        attention_to_text,
        label="attention mass on text",
        higher_means="expert 1 attends more to the text (not a loss)",
        scope="episode",
        curves=True,
        heatmaps=True,
    ),
)
BY_NAME: dict[str, Metric] = {m.name: m for m in REGISTRY}
# metric -> (streams it applies to, one-line definition): the shape metrics.json and older callers read.
METRICS: dict[str, tuple[tuple[str, ...], str]] = {m.name: (m.streams, m.definition) for m in REGISTRY}
CURVE_METRICS = tuple(m.name for m in REGISTRY if m.curves)
HEATMAP_METRICS = tuple(m.name for m in REGISTRY if m.heatmaps)
TEXT_DECODING_METRICS = tuple(m.name for m in REGISTRY if m.needs_embedding)

# Why a metric has no values for a stream it does not apply to.
NOT_APPLICABLE = {
    "expert_0": "expert 0's image positions hold no prompt token to decode; text decoding applies to its text "
    "positions (text_only)",
    "expert_1": "expert 1 reads no text tokens (state + action tokens): there is no token identity to decode",
    "text_only": "the text positions hold the prompt's own tokens, so decoding the prompt there is trivial; "
    "prompt decoding applies to expert_0's image positions and to expert_1",
    "attention": "attention_to_text is captured for expert-1 queries only (they attend to expert 0's text keys)",
}
# Definitions of the summaries that are not per-step metrics (the task probe, the action-chunk divergence).
OTHER_DEFINITIONS = {
    "task_probe": "held-out accuracy of a logistic-regression probe of the task id (folds grouped by episode) "
    "with chance and a shuffled-label control",
    "action_divergence": "mean over the chunk of the L2 distance between the action chunks under the prompt "
    "and the counterfactual prompt",
}


def applies(metric: Metric, stream: S.Stream, embedding: TokenEmbedding | None) -> bool:
    """Whether the driver computes ``metric`` for ``stream`` (hidden states stored, embedding when needed)."""
    if stream.name not in metric.streams:
        return False
    if metric.scope == "episode":
        return True
    return stream.key is not None and (embedding is not None or not metric.needs_embedding)
