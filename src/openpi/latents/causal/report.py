"""The causal-map section of the language report (report.md), when `scripts/causal_map.py` wrote its maps into
<report dir>/causal_map. Reads causal_map.json only (no jax, no model)."""

from __future__ import annotations

import json
import pathlib

MAP_DIR = "causal_map"


def _reasons(d: dict) -> str:
    return ": " + "; ".join(d["reasons"]) if d["reasons"] else ""


def causal_section(report_dir: pathlib.Path) -> list[str]:
    """report.md lines: definition, counts, the heatmaps, the paths and a one-line reading per map; [] without maps."""
    path = pathlib.Path(report_dir) / MAP_DIR / "causal_map.json"
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    lines = [
        "## Causal maps (activation patching)",
        "",
        f"Model {doc.get('model')}, corrupted prompt: {doc.get('corrupt')}; {len(doc.get('pairs', []))} observation "
        f"pairs from {doc.get('n_tasks')} tasks / {doc.get('n_episodes')} episodes; per-site 95% intervals: "
        f"{doc.get('resampling_unit')} bootstrap. Score: {doc['definition']}. Layout: {doc.get('corrupt_layout')}.",
        "",
    ]
    for direction, d in doc["directions"].items():
        figure = f"{MAP_DIR}/causal_map_{direction}.png"
        p = d["paths"]
        lines += [
            f"### {direction} ({d['n_pairs']} pairs, {d['n_nan']} without an effect{_reasons(d)})",
            "",
            f"![causal map {direction}]({figure}) (interval widths: `{MAP_DIR}/causal_map_{direction}_interval.png`)",
            "",
            f"- Paths (prefix keys/values read by expert 1 at every step and layer): direct (text) "
            f"{p['direct']['mean']:.2f} [{p['direct']['low']:.2f}, {p['direct']['high']:.2f}], indirect (image tokens) "
            f"{p['indirect']['mean']:.2f} [{p['indirect']['low']:.2f}, {p['indirect']['high']:.2f}].",
        ]
        if d.get("spearman_exact_vs_attribution"):
            rho = d["spearman_exact_vs_attribution"]
            rhos = ", ".join(f"{r:.2f}" for r in rho)
            lines.append(f"- Attribution patching vs exact, Spearman over sites per pair: {rhos}.")
        lines += [f"- {line}" for line in d["readings"]] + [""]
    return lines
