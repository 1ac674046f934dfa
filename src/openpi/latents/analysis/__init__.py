"""Language-loss analysis of a latent collection (store, pickles or in-memory task data).

Rooms, in the order data flows through them:

* :mod:`~openpi.latents.analysis.data`: data access — one reader over a store, pickles or task dicts (one layer at a
  time), the layer / denoising-step labels, the three streams (text_only, expert_0, expert_1) and valid cameras, the
  token embedding for text decoding, notebook accessors.
* :mod:`~openpi.latents.analysis.measures`: the numbers — pure numpy definitions (text decoding, prompt sensitivity,
  drift, attention, probes, geometry; definitions in their docstrings).
* :mod:`~openpi.latents.analysis.stats`: statistics — bootstrap intervals, the task-cluster bootstrap, the
  within-task success test, Holm's correction.
* :mod:`~openpi.latents.analysis.metrics`: the registered metrics — ``REGISTRY`` (the one place a metric is added)
  and the compute functions it names (per-step, pooled, prompt decoding).
* :mod:`~openpi.latents.analysis.run`: the run — :func:`analyze_collection` (the per-layer driver), what it returns
  (:class:`CollectionAnalysis`) and its summaries, expert 1 per denoising step, the openpi-style language-loss view.
* :mod:`~openpi.latents.analysis.compare`: comparisons — conditions against their paired baseline; two models (pi0
  vs pi0.5) on the same episodes.

Imports no model, policy or env code at import time (model code is imported inside the functions that need it).
"""

from openpi.latents.analysis.data.embedding import TokenEmbedding
from openpi.latents.analysis.data.streams import STREAMS
from openpi.latents.analysis.metrics.registry import METRICS, NOT_APPLICABLE, REGISTRY, Metric
from openpi.latents.analysis.run.driver import analyze_collection
from openpi.latents.analysis.run.result import CollectionAnalysis, EpisodeRef, attention_means, quiet_nan_warnings

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
