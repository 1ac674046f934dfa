"""What a metric sees and returns: :class:`LayerBlock` (per-step metrics), :class:`RunContext` (the analysis they are
part of), :class:`Metric` (one registry entry). Metrics never see the result (:class:`CollectionAnalysis`): they
return their values and the driver (:mod:`openpi.latents.analysis.run.driver`) assembles the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from openpi.latents.analysis.data import streams as S
from openpi.latents.analysis.data.episodes import EpisodeRef

if TYPE_CHECKING:
    from openpi.latents.analysis.data.embedding import TokenEmbedding
    from openpi.latents.analysis.run.settings import AnalysisSettings


@dataclasses.dataclass
class RunContext:
    """One analysis as its metrics see it: what they read (``source``, ``settings``, ``episodes``, ``denoise``: the
    denoising-step ids and their kind) and, owned by the driver, what they report besides their values: ``missing``
    (why a metric has no values for a stream), ``attention`` (the attention summaries' sums), ``cf_text_positions``
    (text positions compared per counterfactual rerun) and ``shared`` (collection-level fits shared by the episodes
    of a layer). The driver puts these into the result."""

    source: Any
    settings: AnalysisSettings
    episodes: list[EpisodeRef]
    denoise: Mapping[str, Any]
    missing: dict[str, str] = dataclasses.field(default_factory=dict)
    attention: dict[str, Any] = dataclasses.field(default_factory=dict)
    cf_text_positions: list[int] = dataclasses.field(default_factory=list)
    shared: dict[Any, Any] = dataclasses.field(default_factory=dict)

    def task_ids(self) -> np.ndarray:
        """[episodes] the task of each episode (the cluster of every interval)."""
        return np.array([e.task_id for e in self.episodes])


Rows = Sequence[int] | slice
Values = tuple[Rows, np.ndarray]


@dataclasses.dataclass
class LayerBlock:
    """What a metric sees: rollout steps ``steps`` of stored layer ``layer`` of ``stream`` in one episode.

    ``x``: the stream's states [steps, ...] (:func:`streams.states`); ``mask``: its valid positions (text_only: the
    prompt's ``text_mask``; expert_0: the positions of valid cameras; None: all), as the driver read them. ``carry``
    lives across the blocks of one episode and layer (drift keeps the first rollout step there). ``run``: the settings
    and episodes of the analysis, and where a metric reports besides its values (:class:`RunContext`).
    """

    source: Any
    run: RunContext
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
