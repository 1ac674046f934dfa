"""The metrics of the analysis: :data:`REGISTRY`, the one list of them, and what a compute function sees.

Adding a metric is one compute function (per-step: :mod:`~openpi.latents.analysis.metrics.step`; pooled:
:mod:`~openpi.latents.analysis.metrics.pooled`) plus one :class:`Metric` entry in :data:`REGISTRY`: the per-layer driver
(:mod:`openpi.latents.analysis.run.driver`) calls every entry that applies to a stream, and the report (metrics.json,
tables, figures, definitions) and the openpi-style language-loss view take the list, definitions and labels from here.

A ``"block"`` metric sees one :class:`LayerBlock` (a block of rollout steps of one layer of one stream of one episode,
already read) and returns ``(rows, values)``: the rollout-step indices it has values for and one value per row, or
None when it has nothing for this block. An ``"episode"`` metric is called once per episode and layer (its block
spans every rollout step; ``x`` is None) and reads what it needs itself. Shared work is computed once per block
through :meth:`LayerBlock.cached`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from openpi.latents.analysis.data import streams as S
from openpi.latents.analysis.metrics import pooled as PM
from openpi.latents.analysis.metrics import prompt_decoding as PD
from openpi.latents.analysis.metrics import step as SM

if TYPE_CHECKING:
    from openpi.latents.analysis.data.embedding import TokenEmbedding
    from openpi.latents.analysis.run.result import CollectionAnalysis, EpisodeRef

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
    layer_mean: np.ndarray | None = None  # [W] collection mean of the layer's drift states (centred drift)

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
    scope: str = "block"  # "block": per block of rollout steps; "episode": once per episode and layer; "pooled":
    # once per layer on rows pooled over a sample of the collection (openpi.latents.analysis.metrics.pooled_rows)
    needs_embedding: bool = False  # skipped (with the reason) without a token embedding
    curves: bool = False  # drawn in the per-layer curves
    heatmaps: bool = False  # drawn as layer × rollout-step heatmaps and split by success
    fraction: bool = False  # a fraction in [0, 1]: figures keep the full scale
    needs_layer_mean: bool = False  # the driver first computes the layer's collection mean (LayerBlock.layer_mean)


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
        SM.language_loss,
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
        SM.text_accuracy,
        label="text reconstruction accuracy",
        higher_means="more of the prompt is decodable",
        needs_embedding=True,
        fraction=True,
    ),
    Metric(
        "logit_nll",
        _TEXT,
        _LENS + "−log softmax(E·RMSNorm_final(h))[token], nats",
        SM.logit_nll,
        label="logit-lens NLL (nats)",
        higher_means="the prompt token is less likely under the logit lens",
        needs_embedding=True,
        curves=True,
    ),
    Metric(
        "logit_rank",
        _TEXT,
        _LENS + "rank of the prompt token among all vocab logits (0 = top)",
        SM.logit_rank,
        label="logit-lens rank",
        higher_means="the prompt token ranks lower under the logit lens",
        needs_embedding=True,
    ),
    Metric(
        "logit_top1",
        _TEXT,
        _LENS + "fraction of positions where the prompt token has the top logit",
        SM.logit_top1,
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
        "token under both prompts, which with a blank counterfactual is BOS alone: a one-position measure; "
        + SM.EXPERT1_SENSITIVITY_NOTE
        + ")",
        SM.prompt_sensitivity,
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
        "scene-only state scores 0, guessing 1/K² for K prompts; a content-free state that knows the scene scores the "
        "scene-aware chance (metrics.json scene_chance: the mean largest share of one rerun prompt in a task). Blank "
        "reruns are refused and each task needs two distinct rerun prompts (else left out / NaN with the reason). "
        "expert_0: per-camera means of valid cameras; expert_1: state token and mean action token at the first "
        "captured denoising step",
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
        "uncentred 1 − cos(x_t, x_0) over all positions flattened, to the first rollout step of the same episode "
        "(can hide change along directions orthogonal to a shared high-norm direction: read centred_drift; "
        "expert_0: valid cameras only; expert_1: at "
        "the last captured denoising step, the one closest to the action: openpi draws fresh noise at every "
        "inference, so early denoising steps drift by the noise alone)",
        SM.drift,
        label="drift 1 − cos(x_t, x_0)",
        higher_means="the stream moved further from the episode's first rollout step",
        curves=True,
        heatmaps=True,
    ),
    Metric(
        "centred_drift",
        S.STREAMS,
        "mean over positions of 1 − cos(x_t − μ, x_0 − μ), μ = the collection mean of the layer over every valid "
        "position, rollout step and episode; each position compared with itself, against the episode's first "
        "rollout step (expert_0: valid cameras only; expert_1: at the last captured denoising step). Centring removes "
        "the shared high-norm directions that make the uncentred drift read a large change as almost none",
        SM.centred_drift,
        label="centred drift 1 − cos(x_t − μ, x_0 − μ)",
        higher_means="the stream moved further from the episode's first rollout step, shared directions removed",
        curves=True,
        heatmaps=True,
        needs_layer_mean=True,
    ),
    Metric(
        "attention_to_text",
        ("expert_1",),
        "attention mass (summed softmax probability) of expert-1 queries on the text content keys — the valid text "
        "keys without BOS and the last valid one (pi0's trailing newline), which are the same for every prompt; every "
        "valid text key with include_constant_tokens — mean over denoising steps, heads and queries",
        SM.attention_to_text,
        label="attention mass on text (no BOS / newline)",
        higher_means="expert 1 attends more to the text (not a loss)",
        scope="episode",
        curves=True,
        heatmaps=True,
    ),
    Metric(
        "attention_to_text_normalised",
        ("expert_1",),
        "attention_to_text of each query and head divided by the share of the keys that query may attend to (its "
        "attention mask, knockouts included) that are text content keys: 1 = what uniform attention over the visible "
        "keys gives, > 1 = more; mean over denoising steps, heads and queries (per head in metrics.json "
        "attention_by_denoise_step.normalised.per_head)",
        SM.attention_to_text_normalised,
        label="attention to text / text share of keys",
        higher_means="expert 1 attends to the text more than its share of the keys (uniform attention = 1)",
        scope="episode",
        curves=True,
    ),
    Metric(
        "attention_to_bos",
        ("expert_1",),
        "attention mass of expert-1 queries on BOS (the first valid text key, the same for every prompt: a likely "
        "attention sink), reported apart from the text; mean over denoising steps, heads and queries",
        SM.attention_to_bos,
        label="attention mass on BOS",
        higher_means="expert 1 parks more attention on BOS (a sink, not prompt use)",
        scope="episode",
        curves=True,
    ),
    # ---- pooled metrics (issue 10: information, geometry): one value per layer over a sample of the collection,
    # computed by openpi.latents.analysis.metrics.pooled_rows; unit of resampling / held-out unit: the task
    # (settings.pooled_split)
    Metric(
        "token_probe",
        _TEXT,
        "held-out accuracy of a ridge linear probe of the token id at the prompt's content positions (no BOS, no "
        "trailing newline), folds grouped by task (prompts never seen in training; test tokens must occur in "
        "training: coverage); control task: every prompt slot (task, position) relabelled with another slot's token "
        "(same label distribution); selectivity = accuracy − control accuracy",
        PM.token_probe,
        label="token-identity probe accuracy",
        higher_means="token identity is linearly decodable from the state",
        scope="pooled",
        fraction=True,
    ),
    Metric(
        "tuned_lens",
        _TEXT,
        "held-out top-1 of a tuned lens: a per-layer affine translator (ridge least squares) to expert 0's final "
        "representation at the same position (text_only_final_norm, after the final norm, when captured; else the "
        "last stored layer through the final RMSNorm), read through the tied unembedding; folds grouped by task; the "
        "plain logit lens on the same held-out rows beside it",
        PM.tuned_lens,
        label="tuned-lens top-1",
        higher_means="the prompt token is readable through the unembedding after an affine translation",
        scope="pooled",
        needs_embedding=True,
        fraction=True,
    ),
    Metric(
        "effective_rank",
        S.STREAMS,
        "exp of the entropy of the normalised singular values σ/Σσ of the column-centred rows (text_only: content "
        "positions; expert_0: valid cameras' pooled states; expert_1: suffix tokens at the last captured denoising "
        "step); bounded by min(rows, width)",
        PM.effective_rank,
        label="effective rank",
        higher_means="the states spread over more directions",
        scope="pooled",
    ),
    Metric(
        "cka_layers",
        S.STREAMS,
        "debiased linear CKA (unbiased HSIC) between the same rows at two stored layers; per layer: with the "
        "previous stored layer; the full layer × layer matrix in the report",
        PM.cka_layers,
        label="CKA with the previous layer",
        higher_means="the layer changes the representation less",
        scope="pooled",
        fraction=True,
    ),
    Metric(
        "cka_experts",
        ("expert_1",),
        "debiased linear CKA, one row per sampled inference (the task probe's features), between expert 1 and "
        "expert 0 (image stream; text stream beside it) at the same stored layer; values on expert_1 only",
        PM.cka_experts,
        label="CKA expert 1 vs expert 0",
        higher_means="the action expert's states share more structure with expert 0's",
        scope="pooled",
        fraction=True,
    ),
    Metric(
        "cka_denoise",
        ("expert_1",),
        "debiased linear CKA of expert 1's suffix tokens 1: (pi0: the action tokens; the state token is the same at "
        "every step by construction) between the first and the last captured denoising step; [S, S] matrix beside it",
        PM.cka_denoise,
        label="CKA first vs last denoising step",
        higher_means="the representation changes less over denoising",
        scope="pooled",
        fraction=True,
    ),
    # ---- end of the pooled metrics
)
BY_NAME: dict[str, Metric] = {m.name: m for m in REGISTRY}
# metric -> (streams it applies to, one-line definition): the shape metrics.json and older callers read.
METRICS: dict[str, tuple[tuple[str, ...], str]] = {m.name: (m.streams, m.definition) for m in REGISTRY}
CURVE_METRICS = tuple(m.name for m in REGISTRY if m.curves)
POOLED_METRICS = tuple(m.name for m in REGISTRY if m.scope == "pooled")
HEATMAP_METRICS = tuple(m.name for m in REGISTRY if m.heatmaps)
TEXT_DECODING_METRICS = tuple(m.name for m in REGISTRY if m.needs_embedding)

# Why a metric has no values for a stream it does not apply to.
NOT_APPLICABLE = {
    "expert_0": "expert 0's image positions hold no prompt token to decode; text decoding applies to its text "
    "positions (text_only)",
    "expert_1": "expert 1 reads no text tokens (state + action tokens): there is no token identity to decode",
    "text_only": "the text positions hold the prompt's own tokens, so decoding the prompt there is trivial; "
    "prompt decoding applies to expert_0's image positions and to expert_1",
    "attention": "attention to text is captured for expert-1 queries only (they attend to expert 0's text keys)",
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
