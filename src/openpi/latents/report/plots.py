"""PNG figures of a :class:`~openpi.latents.analysis.run.result.CollectionAnalysis` (matplotlib, Agg backend).

Every figure is a grid of equally sized panels (``PANEL_IN`` inches at ``DPI``, no tight bbox), so a figure with
``rows × cols`` panels is exactly ``cols·PANEL_IN[0]·DPI × rows·PANEL_IN[1]·DPI`` pixels; each plot function returns
its panel titles and grid, which the report records in metrics.json (the end-to-end test checks both). A figure whose
data is missing still gets one panel that states the reason. With a control collection (``--control``) every
per-layer curve has the control's values dashed beside it (:mod:`~openpi.latents.report.control`).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from openpi.latents.analysis.metrics import registry as R
from openpi.latents.analysis.run.result import CollectionAnalysis, quiet_nan_warnings
from openpi.latents.report import control as C
from openpi.latents.store.manifest import RunManifest

PANEL_IN = (4.4, 3.3)
DPI = 100
STREAM_COLORS = {"text_only": "tab:blue", "expert_0": "tab:green", "expert_1": "tab:red"}
CURVE_METRICS = R.CURVE_METRICS
HEATMAP_METRICS = R.HEATMAP_METRICS
LABELS = {m.name: m.label for m in R.REGISTRY}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def pixel_size(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure with this grid."""
    return round(cols * PANEL_IN[0] * DPI), round(rows * PANEL_IN[1] * DPI)


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(max(n, 1), max_cols)
    return math.ceil(max(n, 1) / cols), cols


def _figure(
    panels: Sequence[tuple[str, Callable[[Any], None]]], path: pathlib.Path, title: str, max_cols: int = 3
) -> dict[str, Any]:
    """Draws ``panels`` [(title, draw(ax))] on a grid and saves it; returns {file, grid, panels, size_px}."""
    plt = _plt()
    rows, cols = _grid(len(panels), max_cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL_IN[0], rows * PANEL_IN[1]), dpi=DPI, squeeze=False)
    for ax, (name, draw) in zip(axes.flat, panels):
        draw(ax)
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    from matplotlib.ticker import FixedLocator, MaxNLocator

    for ax in axes.flat:  # layers and steps are integers (unless the panel set its own ticks)
        if not isinstance(ax.xaxis.get_major_locator(), FixedLocator):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return {
        "file": path.name,
        "grid": [rows, cols],
        "panels": [p[0] for p in panels],
        "size_px": list(pixel_size(rows, cols)),
    }


def _note(text: str) -> Callable[[Any], None]:
    def draw(ax):
        ax.axis("off")
        ax.text(0.5, 0.5, "\n".join(_wrap(text, 48)), ha="center", va="center", fontsize=8, wrap=True)

    return draw


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def _ylabel(ax, metric: str) -> None:
    ax.set_ylabel(LABELS[metric], fontsize=8)
    if R.BY_NAME[metric].fraction:  # fractions: keep the full scale
        ax.set_ylim(-0.03, 1.03)


def _layer_label(res: CollectionAnalysis, streams) -> str:
    """x label of a per-layer panel: "layer", or says which streams are labelled by capture position."""
    pos = [s for s in ([streams] if isinstance(streams, str) else streams) if res.streams[s].layer_kind != "model"]
    return "layer" if not pos else f"layer (capture position: {', '.join(pos)})"


def _band(ax, x, cis, color, label):
    est = np.array([c.estimate for c in cis], float)
    lo, hi = np.array([c.low for c in cis], float), np.array([c.high for c in cis], float)
    ax.plot(x, est, "o-", color=color, label=label, ms=3)
    ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)


def layer_curves(res: CollectionAnalysis, out: pathlib.Path) -> dict[str, Any]:
    """Per-layer curves, one panel per metric, one line per stream (mean over episodes, 95% bootstrap band)."""
    panels = []
    for metric in CURVE_METRICS:
        have = [s for s in R.BY_NAME[metric].streams if res.has(s, metric)]
        if not have:
            continue

        def draw(ax, metric=metric, have=have):
            for s in have:
                _band(ax, res.layers(s), res.per_layer(s, metric), STREAM_COLORS[s], s)
                C.draw_metric(ax, res, s, metric, STREAM_COLORS[s], f"{s} ")  # dashed, with --control
            ax.set_xlabel(_layer_label(res, have))
            _ylabel(ax, metric)
            ax.legend(fontsize=7)

        panels.append((f"{metric} per layer", draw))
    for s, probes in res.probes.items():
        panels.append((f"task probe accuracy per layer: {s}", _probe_draw(res, s, probes)))
    if not panels:
        panels = [("no per-layer metric", _note("no stream with per-layer values in this collection"))]
    return _figure(panels, out / "layer_curves.png", "Per-layer metrics by stream (mean over episodes, 95% CI)")


def _probe_draw(res, stream, probes):
    def draw(ax):
        x = res.layers(stream)
        acc = np.array([p.accuracy for p in probes])
        lo, hi = np.array([p.accuracy_ci[0] for p in probes]), np.array([p.accuracy_ci[1] for p in probes])
        ax.plot(x, acc, "o-", color=STREAM_COLORS[stream], label="probe (held-out episodes)", ms=3)
        ax.fill_between(x, lo, hi, color=STREAM_COLORS[stream], alpha=0.2, lw=0)
        sh = np.array([p.shuffled_mean for p in probes])
        slo, shi = np.array([p.shuffled_ci[0] for p in probes]), np.array([p.shuffled_ci[1] for p in probes])
        ax.plot(x, sh, "s--", color="gray", label="shuffled-label control", ms=3)
        ax.fill_between(x, slo, shi, color="gray", alpha=0.2, lw=0)
        ax.plot(x, [p.chance_majority for p in probes], ":", color="k", label="chance (majority)")
        C.draw_line(ax, res, stream, C.control_probe(res, stream), STREAM_COLORS[stream], "probe ")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(_layer_label(res, stream))
        ax.set_ylabel("task-id accuracy", fontsize=8)
        ax.legend(fontsize=7)

    return draw


def probe_figure(res: CollectionAnalysis, out: pathlib.Path) -> dict[str, Any]:
    panels = [(f"task probe: {s}", _probe_draw(res, s, p)) for s, p in res.probes.items()]
    if not res.probes:
        panels = [("task probe not run", _note(res.missing.get("probe", "the probe was disabled")))]
    return _figure(panels, out / "probe.png", "Task-id probe vs chance and shuffled-label control (folds by episode)")


def heatmaps(res: CollectionAnalysis, out: pathlib.Path) -> dict[str, Any]:
    """Layer × rollout-step heatmaps (mean over the episodes that reached each step), per stream and metric."""
    panels = []
    for metric in HEATMAP_METRICS:
        for s in R.BY_NAME[metric].streams:
            if not res.has(s, metric):
                continue

            def draw(ax, s=s, metric=metric):
                grid, counts = res.heatmap_progress(s, metric)
                layers = res.layers(s)
                im = ax.imshow(
                    grid,
                    aspect="auto",
                    origin="lower",
                    cmap="viridis",
                    interpolation="nearest",
                    extent=(-0.5, grid.shape[1] - 0.5, -0.5, len(layers) - 0.5),
                )
                ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
                n = counts.max(axis=0) if counts.size else np.zeros(grid.shape[1], int)
                k = grid.shape[1]
                ax.set_xticks(range(k), [f"{100 * (i + 1) // k}%\nn={int(c)}" for i, c in enumerate(n)], fontsize=5)
                ax.set_xlabel("normalised progress bin (episodes per column)")
                ax.set_ylabel(_layer_label(res, s))
                ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)

            panels.append((f"{s}: {metric}", draw))
    if not panels:
        panels = [("no heatmap", _note("no per-step metric in this collection"))]
    return _figure(
        panels, out / "heatmaps.png", "Layer × normalised-progress heatmaps (mean over episodes; n: episodes/column)"
    )


def success_failure(res: CollectionAnalysis, out: pathlib.Path) -> dict[str, Any]:
    """Per-layer metric of successful vs failed episodes, each with a 95% bootstrap band over episodes."""
    panels = []
    n_s, n_f = res.split_counts()
    window = res.split_window()
    for metric in HEATMAP_METRICS:
        for s in R.BY_NAME[metric].streams:
            if not res.has(s, metric):
                continue

            def draw(ax, s=s, metric=metric):
                splits = res.success_split(s, metric)
                x = res.layers(s)
                if n_s:
                    _band(ax, x, [sp.success for sp in splits], "tab:green", f"success (n={n_s})")
                if n_f:
                    _band(ax, x, [sp.failure for sp in splits], "tab:red", f"failure (n={n_f})")
                C.draw_success_split(ax, res, s, metric)
                if not (n_s and n_f):
                    ax.text(
                        0.5,
                        0.95,
                        "only one outcome in this collection",
                        transform=ax.transAxes,
                        ha="center",
                        va="top",
                        fontsize=7,
                        color="gray",
                    )
                ax.set_xlabel(_layer_label(res, s))
                _ylabel(ax, metric)
                ax.legend(fontsize=7)

            panels.append((f"{s}: {metric}", draw))
    if not panels:
        panels = [("no metric", _note("no per-layer metric to split by success"))]
    scope = {
        "step": "at equal rollout steps, episodes at risk",
        "progress": "SECONDARY view: episodes by normalised progress, length-confounded",
        "all": "all rollout steps",
        "common": f"first {window} rollout steps of every episode",
    }[res.settings.stats.success_window]
    return _figure(
        panels,
        out / "success_failure.png",
        f"Success vs failure pooled ({scope}; errored out; 95% task-cluster CI; within-task test: report.md)",
    )


def prompt_sensitivity(res: CollectionAnalysis, out: pathlib.Path) -> dict[str, Any]:
    """Prompt sensitivity per layer for each stream, by task, plus the action-chunk divergence per episode."""
    panels = []
    tasks = sorted({e.task_id for e in res.episodes})
    for s in R.BY_NAME["prompt_sensitivity"].streams:
        if not res.has(s, "prompt_sensitivity"):
            continue

        def draw(ax, s=s):
            _band(ax, res.layers(s), res.per_layer(s, "prompt_sensitivity"), STREAM_COLORS[s], "all episodes")
            C.draw_metric(ax, res, s, "prompt_sensitivity", name="all episodes ")
            pe = res.per_episode(s, "prompt_sensitivity")
            for t in tasks:
                rows = [i for i, e in enumerate(res.episodes) if e.task_id == t]
                with quiet_nan_warnings():
                    ax.plot(res.layers(s), np.nanmean(pe[rows], axis=0), lw=0.8, alpha=0.6, label=f"task {t}")
            ax.set_xlabel(_layer_label(res, s))
            ax.set_ylabel(LABELS["prompt_sensitivity"], fontsize=8)
            ax.legend(fontsize=6)

        panels.append((f"prompt sensitivity: {s}", draw))
    if "action_divergence" not in res.missing:

        def draw_actions(ax):
            v = res.action_divergence_per_episode()
            colors = ["tab:green" if e.success else "tab:red" for e in res.episodes]
            ax.bar(range(len(v)), v, color=colors)
            ax.set_xticks(range(len(v)), [f"{e.task_id}/{e.episode}" for e in res.episodes], fontsize=6, rotation=90)
            C.draw_action_divergence(ax, res)
            ax.set_xlabel("task/episode (green: success)")
            ax.set_ylabel("mean L2 per chunk step", fontsize=8)

        panels.append(("action divergence under the counterfactual prompt", draw_actions))
    if not panels:
        why = res.missing.get("action_divergence", "no counterfactual reruns")
        panels = [("prompt sensitivity not available", _note(why))]
    cf = next((e.counterfactual_prompt for e in res.episodes if e.counterfactual_prompt is not None), None)
    title = "Prompt sensitivity (counterfactual prompt " + (repr(cf) if cf is not None else "none") + ")"
    return _figure(panels, out / "prompt_sensitivity.png", title)


def overview(res: CollectionAnalysis, out: pathlib.Path) -> dict[str, Any]:
    """One figure at a glance: text loss, sensitivity, probe, drift, attention, success split (where present)."""
    panels: list[tuple[str, Callable]] = []
    for metric in ("language_loss", "prompt_sensitivity", "drift"):
        have = [s for s in R.BY_NAME[metric].streams if res.has(s, metric)]
        if have:

            def draw(ax, metric=metric, have=have):
                for s in have:
                    _band(ax, res.layers(s), res.per_layer(s, metric), STREAM_COLORS[s], s)
                    C.draw_metric(ax, res, s, metric, STREAM_COLORS[s], f"{s} ")
                ax.set_xlabel(_layer_label(res, have))
                _ylabel(ax, metric)
                ax.legend(fontsize=7)

            panels.append((LABELS[metric], draw))
    best = next((s for s in ("expert_1", "expert_0", "text_only") if s in res.probes), None)
    if best:
        panels.append((f"task probe: {best}", _probe_draw(res, best, res.probes[best])))
    if res.has("expert_1", "attention_to_text"):

        def att(ax):
            _band(ax, res.layers("expert_1"), res.per_layer("expert_1", "attention_to_text"), "tab:red", "expert_1")
            C.draw_metric(ax, res, "expert_1", "attention_to_text", "tab:red", "expert_1 ")
            ax.set_xlabel(_layer_label(res, "expert_1"))
            ax.set_ylabel(LABELS["attention_to_text"], fontsize=8)

        panels.append(("expert-1 attention to text", att))
    if res.has("expert_1", "drift"):

        def heat(ax):
            grid = res.heatmap("expert_1", "drift")
            im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
            ax.set_xlabel("rollout step")
            ax.set_ylabel("layer index")
            ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)

        panels.append(("expert_1 drift: layer × rollout step", heat))
    if not panels:
        panels = [("nothing to show", _note("no metric could be computed"))]
    n = len(res.episodes)
    src = RunManifest.of(res.source["manifest"])
    title = (
        f"{src.preset or '?'} on {src.suite or '?'}: {res.source['n_tasks']} tasks, {n} episodes, "
        f"{sum(e.success for e in res.episodes)} successes"
    )
    return _figure(panels[:6], out / "overview.png", title)


FIGURES = {
    "overview": overview,
    "layer_curves": layer_curves,
    "heatmaps": heatmaps,
    "success_failure": success_failure,
    "probe": probe_figure,
    "prompt_sensitivity": prompt_sensitivity,
}  # + the attention figure (report.attention_report) and the pooled figures (report.pooled_report), added by
# openpi.latents.report
