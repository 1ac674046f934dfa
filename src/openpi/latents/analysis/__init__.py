"""Language-loss analysis of a latent collection (store, pickles or in-memory task data).

Modules, in the order data flows through them:

* :mod:`~openpi.latents.analysis.source`: one reader over a store, pickles or task dicts (one layer at a time).
* :mod:`~openpi.latents.analysis.labels`: model layer / denoising-step ids of what was stored (from the manifest).
* :mod:`~openpi.latents.analysis.streams`: the three streams (text_only, expert_0, expert_1), valid cameras.
* :mod:`~openpi.latents.analysis.metrics`, :mod:`~openpi.latents.analysis.text_metrics`,
  :mod:`~openpi.latents.analysis.stats`, :mod:`~openpi.latents.analysis.probe`: pure numpy metrics and statistics
  (definitions in their docstrings).
* :mod:`~openpi.latents.analysis.step_metrics`: one compute function per per-step metric;
  :mod:`~openpi.latents.analysis.registry`: ``REGISTRY``, the one list of metrics.
* :mod:`~openpi.latents.analysis.driver`: :func:`analyze_collection`, the per-layer driver;
  :mod:`~openpi.latents.analysis.result`: what it returns (:class:`CollectionAnalysis`) and its summaries.
* :mod:`~openpi.latents.analysis.language_loss`: openpi-style per-layer language-loss slots;
  :mod:`~openpi.latents.analysis.accessors`: notebook accessors; :mod:`~openpi.latents.analysis.embedding`: the
  token embedding for text decoding.
* :mod:`~openpi.latents.analysis.behaviour`: conditions against their paired baseline;
  :mod:`~openpi.latents.analysis.model_matching` / :mod:`~openpi.latents.analysis.model_comparison`: two models (pi0 vs
  pi0.5) on the same episodes.

Imports no model, policy or env code at import time (model code is imported inside the functions that need it).
"""

from openpi.latents.analysis.driver import analyze_collection
from openpi.latents.analysis.embedding import TokenEmbedding
from openpi.latents.analysis.registry import METRICS, NOT_APPLICABLE, REGISTRY, Metric
from openpi.latents.analysis.result import CollectionAnalysis, EpisodeRef, attention_means, quiet_nan_warnings
from openpi.latents.analysis.streams import STREAMS

__all__ = [
    "METRICS",
    "NOT_APPLICABLE",
    "REGISTRY",
    "STREAMS",
    "CollectionAnalysis",
    "EpisodeRef",
    "Metric",
    "TokenEmbedding",
    "analyze_collection",
    "attention_means",
    "quiet_nan_warnings",
]
