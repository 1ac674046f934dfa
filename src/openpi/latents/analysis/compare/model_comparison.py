"""Two models on the same episodes (pi0 vs pi0.5, or two checkpoints): paired success and per-layer metrics.

The collections are matched and their episodes paired (same task, initial state and seed) by
:func:`openpi.latents.analysis.compare.model_matching.match_collections`; A is the report's collection, B the one it is
compared with.

Definitions (also written into the report):

* success rate per task and overall: fraction of the paired episodes that succeeded (episodes that ended with an error
  in either run are left out, with a note);
* Δ success = mean over tasks of (B rate − A rate); 95% t interval over the per-task differences
  (:func:`openpi.latents.analysis.compare.behaviour.task_cluster_bootstrap`); n/a below two tasks;
* McNemar's exact test over the paired episodes (:func:`openpi.latents.analysis.compare.behaviour.mcnemar_exact`):
  b = A success & B failure, c = A failure & B success, p = min(1, 2·P[Bin(b + c, ½) ≤ min(b, c)]);
* per layer, each model's value of a registered metric is its own analysis' summary (mean over episodes of per-episode
  means, task-cluster bootstrap: :meth:`CollectionAnalysis.per_layer`); the **paired difference** is, per paired
  episode, B's episode mean minus A's, averaged over the pairs with a task-cluster t interval
  (:func:`openpi.latents.analysis.stats.clustered.cluster_bootstrap_ci`), computed only where both models store the same
  model layer ids of models of the same depth. Models of different depths are drawn against relative depth
  (layer id / depth: the residual stream entering layer l of L) and get no per-layer paired difference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from openpi.latents.analysis.compare.behaviour import (
    mcnemar_exact,
    paired_mcnemar,
    paired_rates,
    task_cluster_bootstrap,
)
from openpi.latents.analysis.compare.model_matching import MatchedCollections, ModelSide, PairedOutcome
from openpi.latents.analysis.metrics.registry import BY_NAME
from openpi.latents.analysis.run.result import CollectionAnalysis
from openpi.latents.analysis.stats.bootstrap import BootstrapCI
from openpi.latents.analysis.stats.clustered import cluster_bootstrap_ci

# (metric, stream) shown side by side: prompt sensitivity per stream, matched-observation prompt decoding, expert-1
# attention to text and text decoding (registry definitions).
COMPARED: tuple[tuple[str, str], ...] = (
    ("prompt_sensitivity", "text_only"),
    ("prompt_sensitivity", "expert_0"),
    ("prompt_sensitivity", "expert_1"),
    ("prompt_decoding", "expert_0"),
    ("prompt_decoding", "expert_1"),
    ("attention_to_text", "expert_1"),
    ("language_loss", "text_only"),
    ("logit_nll", "text_only"),
)


@dataclasses.dataclass(frozen=True)
class PairedSuccess:
    """Paired success of two models (see the module docstring for the definitions)."""

    pairs: tuple[PairedOutcome, ...]
    diff: float  # mean over tasks of (B rate − A rate)
    diff_ci: tuple[float, float]
    ci_note: str | None
    b: int  # A success & B failure
    c: int  # A failure & B success
    p_mcnemar: float
    n_boot: int

    @property
    def tasks(self) -> list[int]:
        return sorted({p.task_id for p in self.pairs})

    def rates(self, task_id: int | None = None) -> tuple[float, float, int]:
        """(A rate, B rate, paired episodes) of one task or all (pooled over episodes)."""
        return paired_rates([(p.task_id, p.a, p.b) for p in self.pairs], task_id)

    def task_mcnemar(self, task_id: int) -> tuple[int, int, float]:
        return paired_mcnemar([(p.task_id, p.a, p.b) for p in self.pairs], task_id)


def paired_success(pairs: Sequence[PairedOutcome], *, n_boot: int = 2000, seed: int = 0) -> PairedSuccess:
    """Success of B against A over paired episodes: Δ over tasks with its task-cluster bootstrap, McNemar's test."""
    by_a: dict[int, list[bool]] = {}
    by_b: dict[int, list[bool]] = {}
    for p in pairs:
        by_a.setdefault(p.task_id, []).append(bool(p.a))
        by_b.setdefault(p.task_id, []).append(bool(p.b))
    diff, lo, hi, why = task_cluster_bootstrap(by_a, by_b, n_boot=n_boot, seed=seed)
    b = sum(bool(p.a) and not p.b for p in pairs)
    c = sum(bool(p.b) and not p.a for p in pairs)
    return PairedSuccess(tuple(pairs), diff, (lo, hi), why, b, c, mcnemar_exact(b, c), n_boot)


# ---------------------------------------------------------------------------------------------------------------------
# Per-layer metrics side by side


@dataclasses.dataclass(frozen=True)
class SideLayers:
    """One model's per-layer values of one (metric, stream), or why there are none."""

    layers: tuple[int, ...] = ()
    x: tuple[float, ...] = ()  # the x axis: layer ids, or relative depth (layer / depth)
    values: tuple[BootstrapCI, ...] = ()
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class LayerComparison:
    metric: str
    stream: str
    a: SideLayers
    b: SideLayers
    paired: tuple[BootstrapCI, ...] = ()  # per layer: mean over paired episodes of (B − A), task-cluster bootstrap
    paired_reason: str | None = None

    @property
    def definition(self) -> str:
        return BY_NAME[self.metric].definition


def _side_layers(res: CollectionAnalysis, side: ModelSide, metric: str, stream: str, relative: bool) -> SideLayers:
    if not res.has(stream, metric):
        return SideLayers(reason=res.reason(stream, metric))
    layers = tuple(res.layers(stream))
    if relative:
        if res.streams[stream].layer_kind != "model" or not side.depth:
            return SideLayers(reason="layers are capture positions or the depth is unknown: no relative depth")
        x = tuple(layer / side.depth for layer in layers)
    else:
        x = tuple(float(layer) for layer in layers)
    return SideLayers(layers, x, tuple(res.per_layer(stream, metric)))


def _paired_layers(
    matched: MatchedCollections,
    res_a: CollectionAnalysis,
    res_b: CollectionAnalysis,
    metric: str,
    stream: str,
    sa: SideLayers,
    sb: SideLayers,
    *,
    n_boot: int,
    seed: int,
) -> tuple[tuple[BootstrapCI, ...], str | None]:
    if sa.reason or sb.reason:
        return (), "not computed for both models"
    if matched.a.depth != matched.b.depth or sa.layers != sb.layers:
        return (), f"layers differ (depth {matched.a.depth} vs {matched.b.depth}, stored {sa.layers} vs {sb.layers})"
    if any(r.streams[stream].layer_kind != "model" for r in (res_a, res_b)):
        return (), "layers are capture positions, not model layer ids"
    idx_a = {(e.task_id, e.episode): i for i, e in enumerate(res_a.episodes)}
    idx_b = {(e.task_id, e.episode): i for i, e in enumerate(res_b.episodes)}
    keys = [(p.task_id, p.episode) for p in matched.pairs if (p.task_id, p.episode) in idx_a.keys() & idx_b.keys()]
    if not keys:
        return (), "no paired episode in both analyses"
    pe_a, pe_b = res_a.per_episode(stream, metric), res_b.per_episode(stream, metric)
    d = np.stack([pe_b[idx_b[k]] - pe_a[idx_a[k]] for k in keys])  # [pairs, layers]
    tasks = np.array([k[0] for k in keys])
    return tuple(cluster_bootstrap_ci(d[:, j], tasks, n_boot=n_boot, seed=seed) for j in range(d.shape[1])), None


@dataclasses.dataclass(frozen=True)
class ModelComparison:
    """Everything the report's model-comparison section shows (:func:`compare_models`)."""

    matched: MatchedCollections
    success: PairedSuccess
    layers: tuple[LayerComparison, ...]
    x_axis: str  # "layer" or "relative depth"
    n_boot: int
    seed: int
    compare_report: str | None = None  # the B collection's own report folder, relative to the report (if written)

    @property
    def a(self) -> ModelSide:
        return self.matched.a

    @property
    def b(self) -> ModelSide:
        return self.matched.b


def compare_models(
    matched: MatchedCollections,
    res_a: CollectionAnalysis,
    res_b: CollectionAnalysis,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    compared: Sequence[tuple[str, str]] = COMPARED,
) -> ModelComparison:
    """Paired success and the per-layer metrics of both analyses side by side (see the module docstring)."""
    relative = matched.a.depth != matched.b.depth
    sides = [
        dataclasses.replace(side, text_window=res.streams["text_only"].n_text if "text_only" in res.streams else None)
        for side, res in ((matched.a, res_a), (matched.b, res_b))
    ]
    matched = dataclasses.replace(matched, a=sides[0], b=sides[1])
    rows = []
    for metric, stream in compared:
        sa = _side_layers(res_a, matched.a, metric, stream, relative)
        sb = _side_layers(res_b, matched.b, metric, stream, relative)
        paired, why = _paired_layers(matched, res_a, res_b, metric, stream, sa, sb, n_boot=n_boot, seed=seed)
        rows.append(LayerComparison(metric, stream, sa, sb, paired, why))
    return ModelComparison(
        matched,
        paired_success(matched.pairs, n_boot=n_boot, seed=seed),
        tuple(rows),
        "relative depth" if relative else "layer",
        n_boot,
        seed,
    )
