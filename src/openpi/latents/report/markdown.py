"""``report.md``: the collection, the figures with one reading each, definitions, method notes, what is missing."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from openpi.latents.analysis.data.streams import STREAMS
from openpi.latents.analysis.metrics import registry as R
from openpi.latents.analysis.run.result import CollectionAnalysis
from openpi.latents.report.denoise_report import denoise_section
from openpi.latents.report.notes import DRIFT_NOTE, SPLIT_NOTE, TEXT_CF_NOTE
from openpi.latents.report.notes import fmt as _fmt
from openpi.latents.report.pooled_report import pooled_sections
from openpi.latents.report.readings import readings
from openpi.latents.report.statistics import STATE_TOKEN_NOTE, figure_statistics, statistics_line
from openpi.latents.report.tables import TABLES
from openpi.latents.store.manifest import RunManifest

# (figure, section title, reading) in report order
SECTIONS = (
    ("layer_curves", "Per-layer curves per stream", "text"),
    ("heatmaps", "Layer × rollout step", "drift"),
    ("success_failure", "Success vs failure", "success"),
    ("probe", "Task decodability", "probe"),
    ("prompt_sensitivity", "Prompt sensitivity", "sensitivity"),
    ("attention_to_text", "Attention to language", "attention"),
)


def _header(res: CollectionAnalysis, figures: dict[str, Any]) -> list[str]:
    man = RunManifest.of(res.source["manifest"])
    n_s = sum(e.success for e in res.episodes)
    no_steps = res.source.get("episodes_without_steps") or []
    return [
        "# Language-loss report",
        "",
        f"Collection `{res.source['root']}`: preset `{man.preset}`, checkpoint `{man.checkpoint}`, suite "
        f"`{man.suite}`; {res.source['n_tasks']} tasks, {len(res.episodes)} episodes, {n_s} successful. "
        f"Capture: `{json.dumps(man.capture_spec)}`. Token embedding: `{res.source.get('embedding')}`."
        + (
            f" {res.source.get('n_errored', 0)} episode(s) ended with an error, {len(no_steps)} of them before the "
            "first inference (no rollout step: skipped by every metric; listed under Episodes with errors)."
            if res.source.get("n_errored")
            else ""
        ),
        "",
        "## At a glance",
        "",
        f"![overview]({figures['overview']['file']})",
        "",
    ]


def _definitions_and_notes(res: CollectionAnalysis) -> list[str]:
    lines = ["## Definitions", ""] + [f"* **{m.name}**: {m.definition}" for m in R.REGISTRY]
    return lines + [
        "* **task_probe**: logistic-regression probe of the task id from the stream's pooled features (expert_0: "
        "valid cameras only), folds grouped by episode; chance = majority share; control = labels permuted across "
        "episodes.",
        "",
        "## Method notes",
        "",
        f"* Success split: {SPLIT_NOTE}" + _window_text(res),
        f"* Drift: {DRIFT_NOTE}.",
        _floor_text(res),
        f"* State token: {STATE_TOKEN_NOTE}.",
        f"* Prompt sensitivity: {TEXT_CF_NOTE}. expert_0 counts only the image positions of valid cameras "
        "(segment_mask; a masked camera's states are meaningless but prompt-dependent).",
        "",
    ]


def _floor_text(res: CollectionAnalysis) -> str:
    """The bf16 precision floor of the comparison metrics, per stream (median over layers; per layer: metrics.json
    ``metrics[<metric>][<stream>].bf16_floor``)."""
    from openpi.latents.analysis.measures.precision_floor import FLOOR_METRICS, FLOOR_NOTE

    if not res.precision_floor:
        return "* Precision floor: the states are stored in float32 (no bf16 rounding floor)."
    parts = []
    for stream, per_layer in sorted(res.precision_floor.items()):
        vals = ", ".join(f"{m} {np.nanmedian([f[m] for f in per_layer]):.2g}" for m in FLOOR_METRICS)
        parts.append(f"{stream}: {vals}")
    return f"* Precision floor ({FLOOR_NOTE}; median over layers): " + "; ".join(parts) + "."


def _window_text(res: CollectionAnalysis) -> str:
    window = res.settings.stats.success_window
    if window == "progress":
        return (
            " — this report used the SECONDARY normalised-progress view instead "
            f"({res.settings.stats.progress_bins} progress bins; confounded by episode length: successes end early "
            "and drift grows with the step)."
        )
    if window == "common":
        return f" — this report used the common window instead: the first {res.split_window()} rollout steps."
    if window == "all":
        return " — this report used the whole-episode window instead (success_window='all')."
    at = res.split_info()["at_risk"] or {"n_success": [], "n_failure": []}
    both = [i for i, (a, b) in enumerate(zip(at["n_success"], at["n_failure"])) if a and b]
    if not both:
        return " (this report: no rollout step has both outcomes at risk within a task)."
    first, last = both[0], both[-1]
    return (
        f" (this report: {len(both)} rollout steps have both outcomes at risk; at step {first} "
        f"{at['n_success'][first]} successful / {at['n_failure'][first]} failed episodes, at step {last} "
        f"{at['n_success'][last]} / {at['n_failure'][last]}; per step in metrics.json success_split.at_risk)."
    )


def _caveats(res: CollectionAnalysis) -> list[str]:
    lines = []
    if res.notes:
        lines += ["## Labels and masks not read off the manifest", ""]
        lines += [f"* `{k}`: {v}" for k, v in sorted(res.notes.items())] + [""]
    errored = [e for e in res.episodes if e.error is not None]
    if errored:
        lines += ["## Episodes with errors", ""]
        lines += [f"* task {e.task_id} episode {e.episode} ({e.n_steps} rollout steps): {e.error}" for e in errored]
        lines += [""]
    if res.missing:
        lines += ["## Not computed", ""] + [f"* `{k}`: {v}" for k, v in sorted(res.missing.items())] + [""]
    return lines


def report_md(res: CollectionAnalysis, figures: dict[str, Any], summary: dict[str, Any]) -> str:
    """report.md for ``figures`` (as the plots returned them) and the language-loss ``summary``."""
    r = readings(res)
    lines = _header(res, figures)
    lines += [f"* {r[k]}" for k in ("text", "sensitivity", "probe", "drift", "attention", "success")]
    slots = summary["measures"]
    lines += [
        "",
        "Seed view (mean over layers): "
        + ", ".join(f"`{s}` = {slots[s]['measure'] or 'none'}" for s in STREAMS)
        + f"; overall_loss = {_fmt(summary['overall_loss'])} (mean over layers of the text-only language loss).",
        "",
    ]
    stats = figure_statistics(res)
    for name, title, key in SECTIONS:
        lines += [f"## {title}", "", r[key], "", f"![{name}]({figures[name]['file']})", ""]
        lines += [statistics_line(stats[name]), ""]
        if name == "prompt_sensitivity":  # its control: expert 1 per denoising step, teacher-forced beside
            lines += denoise_section(res, figures)
    lines += pooled_sections(res, figures, stats)
    lines += _definitions_and_notes(res) + _caveats(res)
    lines += [
        "## Files",
        "",
        "`metrics.json` (every metric per layer and stream), " + ", ".join(f"`{t}`" for t in TABLES) + ".",
        "",
    ]
    return "\n".join(lines)
