"""``report.md``: the collection, the figures with one reading each, definitions, method notes, what is missing."""

from __future__ import annotations

import json
from typing import Any

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
        f"* State token: {STATE_TOKEN_NOTE}.",
        f"* Prompt sensitivity: {TEXT_CF_NOTE}. expert_0 counts only the image positions of valid cameras "
        "(segment_mask; a masked camera's states are meaningless but prompt-dependent).",
        "",
    ]


def _window_text(res: CollectionAnalysis) -> str:
    window = res.settings.get("success_window", "progress")
    if window == "common":
        return f" — this report used the common window instead: the first {res.split_window()} rollout steps."
    if window == "all":
        return " — this report used the whole-episode window instead (success_window='all')."
    return f" (this report: {res.settings.get('progress_bins', 10)} progress bins)."


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
