"""Expert-1 prompt sensitivity per denoising step in the report: the metrics.json entry, the figure (free-running and
teacher-forced layer × denoising-step heatmaps on one colour scale, and per-step curves at the first and last stored
layer) and the report.md section. Definition: :mod:`openpi.latents.analysis.run.denoise_sensitivity`."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from openpi.latents.analysis.run.denoise_sensitivity import DEFINITION, METRIC, DenoiseSensitivity
from openpi.latents.analysis.run.result import CollectionAnalysis
from openpi.latents.report.notes import fmt
from openpi.latents.report.plots import _figure, _layer_label, _note
from openpi.latents.report.statistics import figure_statistics, statistics_line

LABELS = {"free": "free-running (cf_)", "teacher_forced": "teacher-forced (cf_tf_: baseline's x_t fed)"}
COLORS = {"free": "tab:red", "teacher_forced": "tab:blue"}


def _entry(d: DenoiseSensitivity) -> dict[str, Any]:
    if d.reason is not None:
        return {"per_step_layer": None, "key": d.key, "reason": d.reason}
    return {
        "key": d.key,
        "tokens": d.tokens,
        "layers": list(d.layers),
        "denoise_steps": list(d.denoise_steps),
        "per_step_layer": d.estimate,  # [S][L]
        "ci_low": d.low,
        "ci_high": d.high,
        "n_episodes": d.n_episodes,
        "n_tasks": d.n_tasks,
        "n_reruns": d.n_reruns,
        "unit_of_resampling": d.unit,
        "correction": "none (per-cell 95% intervals, not simultaneous)",
    }


def denoise_json(res: CollectionAnalysis) -> dict[str, Any]:
    """metrics.json ``metrics["prompt_sensitivity_by_denoise_step"]``: both variants ([S][L] values, intervals, counts)
    or the reason each is missing."""
    ds = res.denoise_sensitivity
    out: dict[str, Any] = {"definition": DEFINITION, "stream": "expert_1"}
    if ds:
        out["denoise_step_ids"] = (res.source.get("denoise_steps") or {}).get("kind", "capture_position")
    for v in ("free", "teacher_forced"):
        out[v] = _entry(ds[v]) if v in ds else {"per_step_layer": None, "reason": "not computed"}
    return out


def _heat(d: DenoiseSensitivity, vmax: float, res: CollectionAnalysis) -> Callable:
    def draw(ax):
        im = ax.imshow(d.estimate.T, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=vmax,
                       interpolation="nearest")  # fmt: skip
        ax.set_xticks(range(len(d.denoise_steps)), [str(s) for s in d.denoise_steps], fontsize=7)
        ax.set_yticks(range(len(d.layers)), [str(x) for x in d.layers], fontsize=7)
        by_id = (res.source.get("denoise_steps") or {}).get("kind") == "model"
        ax.set_xlabel("denoising step" if by_id else "denoising step (capture position)")
        ax.set_ylabel(_layer_label(res, "expert_1"))
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)

    return draw


def _curves(ds: dict[str, DenoiseSensitivity], have: list[str], j: int) -> Callable:
    def draw(ax):
        for v in have:
            d = ds[v]
            x = np.arange(len(d.denoise_steps))
            ax.plot(x, d.estimate[:, j], "o-", ms=3, color=COLORS[v], label=LABELS[v])
            ax.fill_between(x, d.low[:, j], d.high[:, j], color=COLORS[v], alpha=0.2, lw=0)
        d = ds[have[0]]
        ax.set_xticks(range(len(d.denoise_steps)), [str(s) for s in d.denoise_steps], fontsize=7)
        ax.set_xlabel("denoising step")
        ax.set_ylabel("prompt sensitivity ‖a−b‖/‖a‖", fontsize=8)
        ax.legend(fontsize=6)

    return draw


def denoise_figure(res: CollectionAnalysis, out: pathlib.Path) -> dict[str, Any]:
    """Free-running and teacher-forced heatmaps (layer × denoising step, one colour scale), and per-step curves of
    both at the first and the last stored layer with their task-bootstrap bands."""
    ds = res.denoise_sensitivity
    have = [v for v in ("free", "teacher_forced") if v in ds and ds[v].reason is None]
    panels: list[tuple[str, Callable]] = []
    if have:
        vmax = max(float(np.nanmax(ds[v].estimate)) if np.isfinite(ds[v].estimate).any() else 0.0 for v in have)
        vmax = vmax if vmax > 0 else 1.0
        for v in ("free", "teacher_forced"):
            if v in have:
                panels.append((f"{LABELS[v]}: layer × denoising step", _heat(ds[v], vmax, res)))
            elif v in ds:
                panels.append((LABELS[v], _note(f"not available: {ds[v].reason}")))
        layers = ds[have[0]].layers
        for j in sorted({0, len(layers) - 1}):
            panels.append((f"layer {layers[j]} per denoising step", _curves(ds, have, j)))
    else:
        why = ds["free"].reason if "free" in ds else "not computed"
        panels = [("expert-1 prompt sensitivity per denoising step", _note(f"not available: {why}"))]
    d = ds.get(have[0]) if have else None
    sizes = f"{d.n_tasks} tasks, {d.n_episodes} episodes" if d is not None else "no reruns"
    title = f"Expert-1 prompt sensitivity per denoising step: {sizes}, 95% task-bootstrap bands"
    return _figure(panels, out / "denoise_sensitivity.png", title, max_cols=2)


def _first_layer(d: DenoiseSensitivity) -> str:
    if d.first_is_input:
        return f"layer {d.layers[0]} (the embedded state, x_t and time: no prompt)"
    return f"layer {d.layers[0]} (the first stored layer; layer 0, the embedded input, was not captured)"


def _reading(res: CollectionAnalysis) -> str:
    ds = res.denoise_sensitivity
    free, tf = ds.get("free"), ds.get("teacher_forced")
    if free is None or free.reason is not None:
        return f"Not available: {free.reason if free is not None else 'not computed'}."
    steps, layers = free.denoise_steps, free.layers
    parts = [
        f"Compared: {free.tokens}.",
        f"Free-running, {_first_layer(free)} reads {fmt(free.estimate[0, 0])} at denoising step {steps[0]} and "
        f"{fmt(free.estimate[-1, 0])} at step {steps[-1]}"
        + (": after step 0 this is trajectory divergence, not the prompt acting on the step." if free.first_is_input
           else ".")
    ]  # fmt: skip
    if tf is None or tf.reason is not None:
        parts.append(f"Teacher-forced control not available ({tf.reason if tf is not None else 'not computed'}).")
        return " ".join(parts)
    parts.append(
        f"Teacher-forced (the baseline's x_t fed), layer {layers[0]} is at most "
        f"{fmt(float(np.nanmax(np.abs(tf.estimate[:, 0]))))} over steps"
        + (" (0 by construction)." if tf.first_is_input else ".")
    )
    parts.append(
        f"At layer {layers[-1]}, step {steps[-1]}: free {fmt(free.estimate[-1, -1])} [{fmt(free.low[-1, -1])}, "
        f"{fmt(free.high[-1, -1])}] vs teacher-forced {fmt(tf.estimate[-1, -1])} [{fmt(tf.low[-1, -1])}, "
        f"{fmt(tf.high[-1, -1])}] (the prompt's own effect)."
    )
    return " ".join(parts)


def denoise_section(res: CollectionAnalysis, figures: dict[str, Any]) -> list[str]:
    """The report.md section: reading, figure, statistics line, definition."""
    stats = figure_statistics(res)[METRIC]
    return [
        "## Expert-1 prompt sensitivity per denoising step",
        "",
        _reading(res),
        "",
        f"![{METRIC}]({figures['denoise_sensitivity']['file']})",
        "",
        statistics_line(stats),
        "",
        f"*Definition: {DEFINITION}.*",
        "",
    ]


DENOISE_FIGURES = {"denoise_sensitivity": denoise_figure}
