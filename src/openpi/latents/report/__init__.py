"""The report folder of an analysis: ``metrics.json``, CSV tables, PNG figures and ``report.md``.

* :mod:`~openpi.latents.report.json_report`: metrics.json (every registered metric per stream and layer, or the
  reason it is missing).
* :mod:`~openpi.latents.report.tables`: the CSV tables; :mod:`~openpi.latents.report.plots`: the PNG figures;
  :mod:`~openpi.latents.report.attention_report`: attention to language (figure, metrics.json section, tables).
* :mod:`~openpi.latents.report.denoise_report`: expert-1 prompt sensitivity per denoising step (free-running vs
  teacher-forced): its metrics.json entry, figure and report.md section.
* :mod:`~openpi.latents.report.markdown`: report.md; :mod:`~openpi.latents.report.readings`: its one-line readings;
  :mod:`~openpi.latents.report.notes`: the method notes both state.

The metric list, definitions and labels come from :data:`openpi.latents.analysis.metrics.registry.REGISTRY`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from openpi.latents.analysis.run.result import CollectionAnalysis
from openpi.latents.report.attention_report import attention_figure
from openpi.latents.report.denoise_report import DENOISE_FIGURES
from openpi.latents.report.json_report import clean, metrics_json
from openpi.latents.report.markdown import report_md
from openpi.latents.report.notes import DRIFT_NOTE, SPLIT_NOTE, TEXT_CF_NOTE
from openpi.latents.report.plots import FIGURES
from openpi.latents.report.pooled_report import POOLED_FIGURES
from openpi.latents.report.readings import readings
from openpi.latents.report.tables import TABLES, write_tables

FIGURES["attention_to_text"] = attention_figure
FIGURES.update(POOLED_FIGURES)  # the information and geometry figures of the pooled metrics
FIGURES.update(DENOISE_FIGURES)  # expert-1 prompt sensitivity per denoising step, free-running vs teacher-forced

__all__ = [
    "DRIFT_NOTE",
    "FIGURES",
    "SPLIT_NOTE",
    "TABLES",
    "TEXT_CF_NOTE",
    "metrics_json",
    "readings",
    "report_md",
    "write_report",
]


def write_report(
    res: CollectionAnalysis, out_dir: str | pathlib.Path, behaviour: Any = None, comparison: Any = None
) -> dict[str, Any]:
    """Writes the report folder; returns the metrics.json content. `behaviour`: an
    `analysis.compare.behaviour.BehaviourAnalysis` whose section (`report.behaviour`) is appended to report.md;
    `comparison`: an `analysis.model_comparison.ModelComparison` (section `report.model_comparison`, metrics.json
    ``model_comparison``)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {name: fn(res, out) for name, fn in FIGURES.items()}
    data = metrics_json(res)
    data["figures"] = figures
    data["tables"] = write_tables(res, out)
    comparison_lines: list[str] = []
    if comparison is not None:
        from openpi.latents.report import model_comparison

        data["figures"]["model_comparison"] = fig = model_comparison.comparison_figure(comparison, out)
        comparison_lines = model_comparison.comparison_section(comparison, out, figure=fig)
        data["model_comparison"] = model_comparison.comparison_json(comparison)
    (out / "metrics.json").write_text(json.dumps(clean(data), indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    text = report_md(res, figures, data["language_loss"])
    if behaviour is not None:
        from openpi.latents.report.behaviour import behaviour_section

        text += "\n" + "\n".join(behaviour_section(behaviour, out))
    if comparison_lines:
        text += "\n" + "\n".join(comparison_lines)
    from openpi.latents.causal.report import causal_section  # maps that scripts/causal_map.py wrote beside it

    causal = causal_section(out)
    if causal:
        text += "\n" + "\n".join(causal)
    (out / "report.md").write_text(text)
    return data
