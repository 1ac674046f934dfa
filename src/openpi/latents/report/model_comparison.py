"""The report's model-comparison section (pi0 vs pi0.5 on the same episodes): tables, a figure, metrics.json entry.

`comparison_section(cmp, out_dir)` writes ``model_comparison_success.csv``, ``model_comparison_layers.csv`` and
``model_comparison.png`` and returns the markdown lines; `comparison_json(cmp)` is metrics.json's
``model_comparison``; `write_report(..., comparison=cmp)` adds both. Definitions:
`openpi.latents.analysis.compare.model_comparison`.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
from typing import Any

import numpy as np

from openpi.latents.analysis.compare.model_comparison import LayerComparison, ModelComparison, SideLayers
from openpi.latents.analysis.compare.model_matching import ModelSide
from openpi.latents.analysis.metrics.registry import BY_NAME
from openpi.latents.analysis.stats.bootstrap import BootstrapCI
from openpi.latents.report.notes import fmt
from openpi.latents.report.plots import _figure, _note
from openpi.latents.report.statistics import statistics_line

FIGURE_FILE = "model_comparison.png"
SUCCESS_CSV = "model_comparison_success.csv"
LAYERS_CSV = "model_comparison_layers.csv"
COLORS = ("tab:blue", "tab:orange")

SUCCESS_DEFINITIONS = (
    "**success rate**: fraction of the paired episodes (same task, initial state and seed in both collections; "
    "episodes that ended with an error in either run left out) that succeeded (the stored `success`: LIBERO's own "
    "`done` in a LIBERO collection)",
    "**Δ success (B − A)**: mean over tasks of (B rate − A rate); 95% t interval over the per-task differences "
    "(t with K − 1 df: honest at few tasks; n/a below two tasks)",
    "**McNemar p**: exact two-sided binomial test over the paired episodes; b = A success and B failure, c = the "
    "reverse; p = min(1, 2·P[Bin(b+c, ½) ≤ min(b, c)])",
    "**paired Δ per layer**: per paired episode, B's mean over its rollout steps minus A's, averaged over the pairs "
    "(cluster-robust t interval over tasks); only the first observation of a pair is the same, afterwards each "
    "model's actions "
    "drive the scene, so it compares the models on their own trajectories",
)


def structure_notes(a: ModelSide, b: ModelSide) -> list[str]:
    """What differs in the two models' structure, and what it means for reading the metrics side by side."""
    if a.family == b.family:
        return [f"Both models are {a.family}: the same architecture, compared as two checkpoints / presets."]
    if {a.family, b.family} != {"pi0", "pi0.5"}:
        return [f"Model families {a.family} and {b.family}: their structural differences are not known here."]
    p0, p5 = (a, b) if a.family == "pi0" else (b, a)
    notes = [
        f"**No state token in pi0.5.** pi0's expert 1 reads a state token and {p0.action_horizon} action tokens "
        f"(pooled segments {list(p0.suffix_segments)}); pi0.5's expert-1 token 0 is an action token "
        f"({p5.action_horizon} action tokens, pooled segments {list(p5.suffix_segments)}). The expert_1 stream "
        "therefore holds different tokens: pi0's token 0 is the same at every denoising step by construction, "
        "pi0.5's is not; prompt decoding's expert-1 features (token 0 and the mean of the rest) and the per-query "
        "attention split read the state token for pi0 and the first action token for pi0.5.",
        "**Time conditioning.** pi0 mixes the flow-matching time into each action token once, at the input (an MLP "
        "over the action projection and the time embedding); pi0.5 conditions every action-expert layer through "
        "adaptive RMSNorms (time-dependent scale, shift and a gate on each residual branch), so its expert-1 states "
        "depend on the time at every layer.",
        f"**Robot state.** pi0: {p0.state_input}. pi0.5 (`{p5.preset}`): {p5.state_input}. The models differ in "
        "training and in their inputs, so a success difference says nothing by itself about language use.",
    ]
    if p0.text_window != p5.text_window:
        notes.append(
            f"**Text window.** {p0.text_window} stored text positions for pi0, {p5.text_window} for pi0.5; text "
            "metrics read the valid prompt positions only, so the extra padding changes nothing."
        )
    return notes


def _random_note(cmp: ModelComparison) -> str:
    rand = [side.label for side in (cmp.a, cmp.b) if str(side.checkpoint).startswith("random(")]
    if not rand:
        return ""
    return f" {' and '.join(rand)}: random weights (no checkpoint): the numbers test the plumbing, not the model."


def _ci_text(c: BootstrapCI | None, nd: int = 3) -> str:
    if c is None:
        return "n/a"
    return f"{fmt(c.estimate, nd)} [{fmt(c.low, nd)}, {fmt(c.high, nd)}]"


def _side_counts(s: SideLayers) -> tuple[str, int, int]:
    if not s.values:
        return "n/a", 0, 0
    return s.values[-1].unit, max(c.n_clusters or 0 for c in s.values), max(c.n for c in s.values)


def _success_stats(cmp: ModelComparison) -> dict[str, Any]:
    s = cmp.success
    n_tasks = len(s.tasks)
    unit = "task (t interval over tasks, K − 1 df)" if n_tasks >= 2 else "none (one task: no interval)"
    return {
        "unit_of_resampling": unit + "; McNemar: exact over paired episodes, no resampling",
        "n_tasks": n_tasks,
        "n_episodes": len(s.pairs),
        "correction": "none (per-task McNemar p-values are not corrected for the number of tasks)",
        "control": f"the other model on the same tasks, initial states and seeds (paired episodes): A = "
        f"{cmp.a.label}, B = {cmp.b.label}",
    }


def _layer_stats(cmp: ModelComparison) -> dict[str, Any]:
    units = sorted({_side_counts(s)[0] for r in cmp.layers for s in (r.a, r.b) if s.values})
    n_tasks = max((_side_counts(s)[1] for r in cmp.layers for s in (r.a, r.b)), default=0)
    n_eps = max((_side_counts(s)[2] for r in cmp.layers for s in (r.a, r.b)), default=0)
    return {
        "unit_of_resampling": " / ".join(f"{u} (cluster-robust t)" if u == "task" else u for u in units) or "n/a",
        "n_tasks": n_tasks,
        "n_episodes": n_eps,
        "correction": "none: per-layer 95% intervals (not simultaneous)",
        "control": "the other model on the paired episodes (paired Δ); each model's own controls (shuffled "
        "labels, teacher-forced reruns, chance) are in its own report",
    }


def _success_rows(cmp: ModelComparison) -> list[dict[str, Any]]:
    s, rows = cmp.success, []
    for t in [*s.tasks, None]:
        ra, rb, n = s.rates(t)
        b, c, p = (s.b, s.c, s.p_mcnemar) if t is None else s.task_mcnemar(t)
        rows.append(
            {
                "task": "all" if t is None else t,
                "language": "" if t is None else cmp.matched.languages.get(t, ""),
                "n_episodes": n,
                "rate_a": ra,
                "rate_b": rb,
                "diff": s.diff if t is None else rb - ra,
                "diff_ci": list(s.diff_ci) if t is None else None,
                "b": b,
                "c": c,
                "p_mcnemar": p,
            }
        )
    return rows


LAYER_COLUMNS = ("metric", "stream", "model", "layer", "x", "estimate", "ci_low", "ci_high", "n_episodes", "n_tasks")
SUCCESS_COLUMNS = ("task", "language", "n_episodes", "rate_a", "rate_b", "diff", "b", "c", "p_mcnemar")


def _layer_rows(r: LayerComparison, cmp: ModelComparison) -> list[list[Any]]:
    """CSV rows: each model's per-layer values (x: layer id or relative depth), then the paired B − A difference."""
    out = []
    series = [(cmp.a.label, r.a.layers, r.a.x, r.a.values), (cmp.b.label, r.b.layers, r.b.x, r.b.values)]
    series.append(("paired B - A", r.a.layers, r.a.x, r.paired))
    for name, layers, xs, values in series:
        for layer, x, c in zip(layers, xs, values):
            out.append([r.metric, r.stream, name, layer, x, c.estimate, c.low, c.high, c.n, c.n_clusters])
    return out


def _write_csvs(cmp: ModelComparison, out: pathlib.Path) -> None:
    """Success per task (rate_a / rate_b: models A and B, diff = B − A) and every per-layer value."""
    with open(out / SUCCESS_CSV, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(SUCCESS_COLUMNS)
        w.writerows([r[k] for k in SUCCESS_COLUMNS] for r in _success_rows(cmp))
    with open(out / LAYERS_CSV, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(LAYER_COLUMNS)
        for r in cmp.layers:
            w.writerows(_layer_rows(r, cmp))


def _success_panel(cmp: ModelComparison):
    def draw(ax):
        rows = _success_rows(cmp)
        x = np.arange(len(rows))
        for i, (side, key) in enumerate(((cmp.a, "rate_a"), (cmp.b, "rate_b"))):
            ax.bar(x + (i - 0.5) * 0.38, [r[key] for r in rows], 0.38, color=COLORS[i], label=side.label)
        ax.set_xticks(x, [f"{r['task']}\nn={r['n_episodes']}" for r in rows], fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("task id (paired episodes)")
        ax.set_ylabel("success rate", fontsize=8)
        ax.legend(fontsize=7)

    return draw


def _layer_panel(cmp: ModelComparison, r: LayerComparison):
    def draw(ax):
        for i, (side, s) in enumerate(((cmp.a, r.a), (cmp.b, r.b))):
            if not s.values:
                continue
            est = np.array([c.estimate for c in s.values], float)
            lo, hi = np.array([c.low for c in s.values], float), np.array([c.high for c in s.values], float)
            ax.plot(s.x, est, "o-" if i == 0 else "s--", color=COLORS[i], label=side.label, ms=3)
            ax.fill_between(s.x, lo, hi, color=COLORS[i], alpha=0.2, lw=0)
        if cmp.x_axis == "relative depth":
            ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_xlabel("relative depth (layer / depth)" if cmp.x_axis == "relative depth" else "layer")
        ax.set_ylabel(BY_NAME[r.metric].label, fontsize=8)
        if BY_NAME[r.metric].fraction:
            ax.set_ylim(-0.03, 1.03)
        ax.legend(fontsize=7)

    return draw


def comparison_figure(cmp: ModelComparison, out: pathlib.Path) -> dict[str, Any]:
    panels = [("paired success per task", _success_panel(cmp))]
    for r in cmp.layers:
        if r.a.values or r.b.values:
            panels.append((f"{r.metric}: {r.stream}", _layer_panel(cmp, r)))
    if len(panels) == 1:
        panels.append(("no per-layer metric", _note("no compared metric was computed for either model")))
    return _figure(panels, out / FIGURE_FILE, f"{cmp.a.label} vs {cmp.b.label} on paired episodes (95% CI)", 3)


def _models_table(cmp: ModelComparison) -> list[str]:
    a, b = cmp.a, cmp.b
    rows = [
        ("collection", f"`{a.root}`", f"`{b.root}`"),
        ("preset", f"`{a.preset}`", f"`{b.preset}`"),
        ("checkpoint", f"`{a.checkpoint}`", f"`{b.checkpoint}`"),
        ("model config", f"`{a.model_config}`", f"`{b.model_config}`"),
        ("depth (layers per expert)", a.depth, b.depth),
        ("action horizon", a.action_horizon, b.action_horizon),
        ("expert-1 pooled segments", ", ".join(a.suffix_segments), ", ".join(b.suffix_segments)),
        ("robot state", a.state_input, b.state_input),
        ("text window (positions)", a.text_window, b.text_window),
    ]
    lines = [f"| | A: {a.label} | B: {b.label} |", "|---|---|---|"]
    return lines + [f"| {k} | {va} | {vb} |" for k, va, vb in rows]


def _layer_table(cmp: ModelComparison) -> list[str]:
    lines = [
        f"| metric · stream | A: {cmp.a.label}, last stored layer | B: {cmp.b.label}, last stored layer "
        "| paired Δ B − A, last layer | tasks / episodes (A; B) |",
        "|---|---|---|---|---|",
    ]
    missing = []
    for r in cmp.layers:
        if not (r.a.values or r.b.values):
            missing.append(f"* `{r.metric}` · `{r.stream}`: {r.a.reason}")
            continue
        cells = []
        for s in (r.a, r.b):
            cells.append(f"L{s.layers[-1]}: {_ci_text(s.values[-1])}" if s.values else f"n/a ({s.reason})")
        paired = _ci_text(r.paired[-1]) if r.paired else f"n/a ({r.paired_reason})"
        (_, ta, ea), (_, tb, eb) = _side_counts(r.a), _side_counts(r.b)
        lines.append(f"| `{r.metric}` · `{r.stream}` | {cells[0]} | {cells[1]} | {paired} | {ta}/{ea}; {tb}/{eb} |")
    if missing:
        lines += ["", "Not computed for either model:", "", *missing]
    return lines


def comparison_section(
    cmp: ModelComparison, out_dir: str | pathlib.Path, figure: dict[str, Any] | None = None
) -> list[str]:
    """Writes the section's CSVs (and its figure, unless `figure` says it is drawn) into `out_dir`; returns its
    markdown lines."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_csvs(cmp, out)
    fig = figure or comparison_figure(cmp, out)
    m, s = cmp.matched, cmp.success
    lines = [
        f"## Model comparison: {cmp.a.label} vs {cmp.b.label}",
        "",
        f"A = {m.a.label} (checkpoint `{m.a.checkpoint}`; this report's collection `{m.a.root}`), B = {m.b.label} "
        f"(checkpoint `{m.b.checkpoint}`; collection `{m.b.root}`"
        + (
            f", its own full report: [{cmp.compare_report}/report.md]({cmp.compare_report}/report.md)"
            if cmp.compare_report
            else ""
        )
        + f"). Suite `{m.suite}`, condition `{m.condition.get('name')}`. Matched before any analysis: "
        + ", ".join(m.checked)
        + f" are equal; {len(s.tasks)} task(s), {len(s.pairs)} paired episode(s)."
        + _random_note(cmp),
        "",
        *_models_table(cmp),
        "",
        "What differs in structure (read the layer metrics with it):",
        "",
        *[f"* {n}" for n in structure_notes(cmp.a, cmp.b)],
        "",
        "### Paired success",
        "",
        f"| task | language | paired episodes | A: {cmp.a.label} | B: {cmp.b.label} | Δ B − A | b | c | McNemar p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _success_rows(cmp):
        diff = fmt(r["diff"])
        if r["task"] == "all":
            diff += " (mean over tasks) " + (s.ci_note or f"[{fmt(s.diff_ci[0])}, {fmt(s.diff_ci[1])}]")
        lines.append(
            f"| {r['task']} | {r['language']} | {r['n_episodes']} | {fmt(r['rate_a'], 2)} | {fmt(r['rate_b'], 2)} "
            f"| {diff} | {r['b']} | {r['c']} | {fmt(r['p_mcnemar'], 4)} |"
        )
    lines += ["", statistics_line(_success_stats(cmp)), ""]
    if m.excluded:
        lines += ["Left out (an error in either run):", "", *[f"* {e}" for e in m.excluded], ""]
    lines += [
        "### Language metrics per layer, side by side",
        "",
        f"![model comparison]({fig['file']})",
        "",
        "Each model's values come from its own analysis (mean over episodes of per-episode means, 95% interval); "
        + (
            "the models' depths differ, so layers are drawn at relative depth (layer / depth)."
            if cmp.x_axis == "relative depth"
            else "x: the residual stream entering each stored layer."
        ),
        "",
        *_layer_table(cmp),
        "",
        statistics_line(_layer_stats(cmp)),
        "",
        "Definitions:",
        "",
        *[f"* {d}" for d in SUCCESS_DEFINITIONS],
        *[f"* **{k}**: {BY_NAME[k].definition}" for k in dict.fromkeys(r.metric for r in cmp.layers)],
        "",
    ]
    return lines


def _cis_json(layers, xs, values, reason: str | None) -> dict[str, Any]:
    if not values:
        return {"per_layer": None, "reason": reason}
    return {
        "layers": list(layers),
        "x": list(xs),
        "per_layer": [c.estimate for c in values],
        "ci_low": [c.low for c in values],
        "ci_high": [c.high for c in values],
        "n_episodes": [c.n for c in values],
        "n_tasks": max(c.n_clusters or 0 for c in values),
        "unit_of_resampling": values[-1].unit,
    }


def comparison_json(cmp: ModelComparison) -> dict[str, Any]:
    """metrics.json's ``model_comparison`` (before :func:`openpi.latents.report.json_report.clean`)."""
    m = cmp.matched
    layers = [
        {
            "metric": r.metric,
            "stream": r.stream,
            "definition": r.definition,
            "a": _cis_json(r.a.layers, r.a.x, r.a.values, r.a.reason),
            "b": _cis_json(r.b.layers, r.b.x, r.b.values, r.b.reason),
            "paired_difference_b_minus_a": _cis_json(r.a.layers, r.a.x, r.paired, r.paired_reason),
        }
        for r in cmp.layers
    ]
    return {
        "models": {k: dataclasses.asdict(v) | {"state_input": v.state_input} for k, v in (("a", m.a), ("b", m.b))},
        "matching": {"checked": m.checked, "suite": m.suite, "condition": m.condition, "excluded": m.excluded},
        "structure": structure_notes(m.a, m.b),
        "success": {
            "per_task": _success_rows(cmp),
            "statistics": _success_stats(cmp),
            "ci_note": cmp.success.ci_note,
            "definitions": list(SUCCESS_DEFINITIONS),
        },
        "layers": {"x_axis": cmp.x_axis, "per_metric": layers, "statistics": _layer_stats(cmp)},
        "compare_report": cmp.compare_report,
    }
