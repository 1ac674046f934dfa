"""The pooled metrics in the report: metrics.json entries, the information and geometry figures, their report.md
sections. Each states its definition, the held-out unit, the number of tasks / episodes and the control beside it
(the control collection, e.g. a random-initialised model on the same observations, when the analysis was given one).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from openpi.latents.analysis.data.streams import STREAMS
from openpi.latents.analysis.metrics import registry as R
from openpi.latents.analysis.run.result import CollectionAnalysis, pooled_values
from openpi.latents.report.control import CONTROL_STYLE
from openpi.latents.report.plots import STREAM_COLORS, _figure, _layer_label, _note
from openpi.latents.report.statistics import figure_statistics, statistics_line

__all__ = ["CONTROL_STYLE", "POOLED_FIGURES", "caption", "pooled_json", "pooled_sections", "pooled_summary"]


def _scalar_extras(vals: list) -> dict[str, list]:
    keys = sorted({k for v in vals if v is not None for k, x in v.extra.items() if np.isscalar(x)})
    return {k: [None if v is None else v.extra.get(k) for v in vals] for k in keys}


def pooled_summary(res: CollectionAnalysis, stream: str, metric: str) -> dict[str, Any]:
    """JSON-ready per-layer values of a pooled metric (NaN where not computed, with the reasons), its scalar extras,
    the sample, and the control collection's values."""
    vals = res.pooled.get((stream, metric))
    if vals is None:
        if stream not in R.BY_NAME[metric].streams:
            return {"per_layer": None, "reason": f"{metric} applies to {', '.join(R.BY_NAME[metric].streams)} only"}
        why = res.missing.get(f"{stream}.{metric}") or res.missing.get(stream) or "not computed"
        if not res.settings.get("pooled", True):
            why = "pooled metrics not requested (pooled=False)"
        return {"per_layer": None, "reason": why}
    out = {
        "layers": res.layers(stream),
        "per_layer": list(pooled_values(res, stream, metric)),
        "extra": _scalar_extras(vals),
        "reasons": [None if v is None else v.reason for v in vals],
        "sample": res.pooled_info,
        "resampling": "none: one value per layer from held-out folds (probe, lens) or the pooled sample",
    }
    for key in ("row", "row_image", "row_text", "matrix"):
        if any(v is not None and key in v.extra for v in vals):
            out[key] = [None if v is None else v.extra.get(key) for v in vals]
    ctrl = res.control
    if ctrl is not None and (stream, metric) in ctrl.pooled:
        out["control"] = {"label": res.control_label, "per_layer": list(pooled_values(ctrl, stream, metric))}
        out["control"]["extra"] = _scalar_extras(ctrl.pooled[(stream, metric)])
    return out


def pooled_json(res: CollectionAnalysis) -> dict[str, Any]:
    """{metric: {stream: :func:`pooled_summary`}} for every pooled metric of the registry."""
    return {m: {s: pooled_summary(res, s, m) for s in STREAMS} for m in R.POOLED_METRICS}


def caption(res: CollectionAnalysis) -> str:
    """Unit, sizes and control of the pooled figures (the figure titles and report.md say it)."""
    info = res.pooled_info
    if not info:
        return "pooled metrics not computed"
    ctrl = f"control (dashed): {res.control_label}" if res.control is not None else "no control collection given"
    return (
        f"{info['n_tasks']} tasks, {info['n_episodes']} episodes, {info['steps_per_episode']} steps/episode; "
        f"held out by {info['split']}; {ctrl}"
    )


def _curve(res, stream, metric, extra=None, label=None, color=None, **kw):
    def draw(ax):
        ax.plot(
            res.layers(stream), pooled_values(res, stream, metric, extra), "o-", ms=3, label=label, color=color, **kw
        )

    return draw


def _lines(res: CollectionAnalysis, stream: str, metric: str, series, ylabel: str, fraction: bool):
    """A per-layer panel: ``series`` [(extra or None, label, color)] of ``metric``; the control's first series
    dashed."""

    def draw(ax):
        x = res.layers(stream)
        for extra, label, color in series:
            ax.plot(x, pooled_values(res, stream, metric, extra), "o-", ms=3, color=color, label=label)
        if res.control is not None and (stream, metric) in res.control.pooled:
            y = pooled_values(res.control, stream, metric, series[0][0])
            ax.plot(x, y, label=f"{series[0][1]}: {res.control_label}", **CONTROL_STYLE)
        ax.set_xlabel(_layer_label(res, stream))
        ax.set_ylabel(ylabel, fontsize=8)
        if fraction:
            ax.set_ylim(-0.03, 1.03)
        ax.legend(fontsize=6)

    return draw


def information_figure(res: CollectionAnalysis, out: pathlib.Path) -> dict[str, Any]:
    """Token-identity probe (accuracy, control task, selectivity) and the tuned lens beside the logit lens."""
    panels: list[tuple[str, Callable]] = []
    if ("text_only", "token_probe") in res.pooled:
        series = [(None, "probe accuracy", "tab:blue"), ("control_accuracy", "control task", "tab:orange")]
        series += [("selectivity", "selectivity", "tab:green"), ("majority", "majority token", "0.7")]
        panels.append(("token probe (held-out; control = slots relabelled)", _lines(
            res, "text_only", "token_probe", series, "accuracy", True)))  # fmt: skip
    if ("text_only", "tuned_lens") in res.pooled:
        series = [(None, "tuned lens top-1", "tab:purple"), ("logit_lens_top1", "logit lens top-1", "tab:red")]
        series += [("final_top1", "final representation", "0.5")]
        panels.append(("tuned lens vs logit lens (held-out)", _lines(
            res, "text_only", "tuned_lens", series, "top-1 (prompt token)", True)))  # fmt: skip
    if not panels:
        why = res.missing.get("text_only.tuned_lens") or res.missing.get("text_only") or "no text stream captured"
        panels = [("token probe / tuned lens", _note(f"not computed: {why}"))]
    return _figure(panels, out / "information.png", f"Token identity, held out ({caption(res)})", max_cols=2)


def _heat(mat, labels, title_note: str = ""):
    def draw(ax):
        m = np.asarray(mat, float)
        im = ax.imshow(
            m,
            origin="lower",
            cmap="viridis",
            vmin=min(0.0, np.nanmin(m)) if np.isfinite(m).any() else 0.0,
            vmax=1.0,
            interpolation="nearest",
        )
        ticks = range(len(labels))
        ax.set_xticks(list(ticks), [str(v) for v in labels], fontsize=6)
        ax.set_yticks(list(ticks), [str(v) for v in labels], fontsize=6)
        ax.set_xlabel(f"layer{title_note}", fontsize=8)
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)

    return draw


def _layer_matrix(res: CollectionAnalysis, stream: str) -> np.ndarray:
    rows = [v.extra.get("row", []) if v is not None else [] for v in res.pooled[(stream, "cka_layers")]]
    n = len(rows)
    m = np.full((n, n), np.nan)
    for j, r in enumerate(rows):
        m[j, : len(r)] = r
        m[: len(r), j] = r
    return m


def geometry_figure(res: CollectionAnalysis, out: pathlib.Path) -> dict[str, Any]:
    """CKA layer × layer per stream, effective rank per layer, expert-1 vs expert-0 CKA, CKA over denoising steps."""
    panels: list[tuple[str, Callable]] = []
    for s in res.streams:
        if (s, "cka_layers") in res.pooled:
            panels.append((f"{s}: CKA layer × layer", _heat(_layer_matrix(res, s), res.layers(s))))
    have = [s for s in res.streams if (s, "effective_rank") in res.pooled]
    if have:

        def erank(ax):
            for s in have:
                _curve(res, s, "effective_rank", label=s, color=STREAM_COLORS[s])(ax)
                if res.control is not None and (s, "effective_rank") in res.control.pooled:
                    y = pooled_values(res.control, s, "effective_rank")
                    ax.plot(res.layers(s), y, label=f"{s}: {res.control_label}", **CONTROL_STYLE)
            ax.set_xlabel(_layer_label(res, have))
            ax.set_ylabel("effective rank", fontsize=8)
            ax.legend(fontsize=6)

        panels.append(("effective rank (exp entropy of σ/Σσ)", erank))
    if ("expert_1", "cka_experts") in res.pooled:
        series = [(None, "vs expert 0 (same layer)", "tab:red")]
        panels.append(("expert 1 vs expert 0: CKA per inference", _lines(
            res, "expert_1", "cka_experts", series, "CKA", True)))  # fmt: skip
    if ("expert_1", "cka_denoise") in res.pooled:
        series = [(None, "first vs last denoising step", "tab:red")]
        panels.append(("expert 1: CKA across denoising", _lines(res, "expert_1", "cka_denoise", series, "CKA", True)))
    if not panels:
        panels = [("geometry", _note("pooled metrics not computed (pooled=False or no hidden states captured)"))]
    return _figure(panels, out / "geometry.png", f"Geometry: debiased linear CKA, effective rank ({caption(res)})")


POOLED_FIGURES = {"information": information_figure, "geometry": geometry_figure}


def _fmt_layers(res: CollectionAnalysis, stream: str, metric: str, extra: str | None = None) -> str:
    v = pooled_values(res, stream, metric, extra)
    return ", ".join(f"{x:.2f}" for x in v) if len(v) else "none"


def pooled_sections(res: CollectionAnalysis, figures: dict[str, Any], stats: dict | None = None) -> list[str]:
    """report.md sections of the pooled figures, with the numbers behind them and each figure's statistics line
    (``stats``: :func:`figure_statistics`, computed here when not given)."""
    stats = figure_statistics(res) if stats is None else stats
    lines = ["## Information: token identity (held out)", "", f"Sample: {caption(res)}.", ""]
    if ("text_only", "token_probe") in res.pooled:
        lines += [
            f"* token probe accuracy per layer: {_fmt_layers(res, 'text_only', 'token_probe')}; control task: "
            f"{_fmt_layers(res, 'text_only', 'token_probe', 'control_accuracy')}; selectivity: "
            f"{_fmt_layers(res, 'text_only', 'token_probe', 'selectivity')}.",
        ]
    if ("text_only", "tuned_lens") in res.pooled:
        lines += [
            f"* tuned lens top-1: {_fmt_layers(res, 'text_only', 'tuned_lens')}; logit lens on the same rows: "
            f"{_fmt_layers(res, 'text_only', 'tuned_lens', 'logit_lens_top1')}.",
        ]
    if res.control is not None:
        lines += [f"* Control collection: {res.control_label} (dashed in the figures; numbers in metrics.json)."]
    lines += ["", f"![information]({figures['information']['file']})", "", statistics_line(stats["information"]), ""]
    lines += ["## Geometry", "", f"Sample: {caption(res)}. CKA is the debiased estimator (unbiased HSIC).", ""]
    for s in res.streams:
        if (s, "effective_rank") in res.pooled:
            lines.append(f"* {s} effective rank per layer: {_fmt_layers(res, s, 'effective_rank')}.")
    lines += ["", f"![geometry]({figures['geometry']['file']})", "", statistics_line(stats["geometry"]), ""]
    return lines
