"""The report's "Behaviour under conditions" section: tables, a condition × task heatmap and per-layer curves.

`behaviour_section(beh, out_dir)` writes ``behaviour.csv`` and the figures and returns the markdown lines;
`write_report(..., behaviour=beh)` appends them to report.md, `write_behaviour_report` writes a report.md of this
section alone. Definitions: `openpi.latents.analysis.compare.behaviour`.
"""

from __future__ import annotations

import csv
import math
import pathlib

import numpy as np

from openpi.latents.analysis.compare.behaviour import BehaviourAnalysis
from openpi.latents.report.notes import fmt
from openpi.latents.report.plots import DPI, PANEL_IN, _plt

HEATMAP_FILE = "behaviour_condition_task.png"
LAYER_FILE = "behaviour_per_layer.png"
CSV_FILE = "behaviour.csv"


def _heatmap(beh: BehaviourAnalysis, out: pathlib.Path) -> str:
    plt = _plt()
    tasks = sorted({t for e in beh.effects for t in e.tasks})
    grid = np.full((len(beh.effects), len(tasks)), np.nan)
    for i, e in enumerate(beh.effects):
        for j, t in enumerate(tasks):
            base, cond, n = e.rates(t)
            grid[i, j] = cond - base if n else np.nan
    fig, ax = plt.subplots(figsize=(max(PANEL_IN[0], 0.5 * len(tasks) + 3), max(PANEL_IN[1], 0.35 * len(grid) + 1.5)))
    im = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(tasks)), [str(t) for t in tasks])
    ax.set_yticks(range(len(beh.effects)), [e.name for e in beh.effects], fontsize=7)
    ax.set_xlabel("task id")
    ax.set_title("success rate: condition − paired baseline", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.savefig(out / HEATMAP_FILE, dpi=DPI)
    plt.close(fig)
    return HEATMAP_FILE


def _layer_curves(beh: BehaviourAnalysis, out: pathlib.Path) -> str | None:
    curves = beh.layer_curves()
    if not curves:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(2 * PANEL_IN[0], PANEL_IN[1]))
    for recipe, effects in curves.items():
        layers = [e.layer for e in effects]
        diff = np.asarray([e.diff for e in effects])
        lo = np.asarray([e.diff_ci[0] for e in effects])
        hi = np.asarray([e.diff_ci[1] for e in effects])
        (line,) = a1.plot(layers, diff, "o-", label=recipe)
        if np.isfinite(lo).all():
            a1.fill_between(layers, lo, hi, color=line.get_color(), alpha=0.2)
        a2.plot(layers, [e.mean_divergence() for e in effects], "o-", label=recipe)
    a1.axhline(0, color="gray", lw=0.5)
    a1.set(xlabel="layer", ylabel="Δ success (condition − baseline)", title="success effect per layer")
    a2.set(xlabel="layer", ylabel="mean action divergence (RMS)", title="action divergence per layer")
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / LAYER_FILE, dpi=DPI)
    plt.close(fig)
    return LAYER_FILE


def _write_csv(beh: BehaviourAnalysis, out: pathlib.Path) -> None:
    with open(out / CSV_FILE, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "condition",
                "task",
                "n_episodes",
                "baseline_rate",
                "condition_rate",
                "b",
                "c",
                "p_mcnemar",
                "test",
                "p_value",
                "p_adjusted",
                "family",
                "mean_divergence",
                "n_diverged",
                "median_first_divergence_t",
            ]
        )
        for e in beh.effects:
            for t in [*e.tasks, None]:
                base, cond, n = e.rates(t)
                b, c, p = (e.b, e.c, e.p_mcnemar) if t is None else e.task_mcnemar(t)
                ps = [q for q in e.pairs if t is None or q.task_id == t]
                first = [q.first_divergence_t for q in ps if q.first_divergence_t is not None]
                w.writerow(
                    [
                        e.name,
                        "all" if t is None else t,
                        n,
                        base,
                        cond,
                        b,
                        c,
                        p,
                        e.test,
                        e.p_value if t is None else (p if e.paired else math.nan),
                        e.p_adjusted if t is None else math.nan,
                        (e.family or "single test") if t is None else "per task: uncorrected",
                        e.mean_divergence(t),
                        len(first),
                        float(np.median(first)) if first else math.nan,
                    ]
                )


def behaviour_section(beh: BehaviourAnalysis, out_dir: str | pathlib.Path) -> list[str]:
    """Writes the section's CSV and figures into `out_dir`; returns its markdown lines."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(beh, out)
    heatmap, layers = _heatmap(beh, out), _layer_curves(beh, out)
    n_tasks = len({t for e in beh.effects for t in e.tasks})
    lines = [
        "## Behaviour under conditions",
        "",
        f"Control: the paired baseline `{beh.baseline}` (condition `{beh.baseline_condition.get('name')}`: the task's "
        "instruction, no intervention). A condition's episode is paired with the baseline's episode of the same task "
        "and initial state run with the same seed; both drew the same noise at every inference index. "
        f"{len(beh.effects)} condition(s), {n_tasks} task(s).",
        "",
        "| condition | tasks | episodes | baseline | condition | Δ (mean over tasks) | 95% CI (t over tasks) "
        "| b | c | test | p | p adjusted | family | mean divergence | diverged | median first t |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in beh.effects:
        base, cond, n = e.rates()
        k, med = e.diverged()
        ci = e.ci_note or f"[{fmt(e.diff_ci[0])}, {fmt(e.diff_ci[1])}]"
        div = ("n/a", "n/a", "n/a") if e.divergence_reason else (fmt(e.mean_divergence(), 4), f"{k}/{n}", fmt(med, 0))
        lines.append(
            f"| `{e.name}` | {len(e.tasks)} | {n} | {fmt(base, 2)} | {fmt(cond, 2)} | {fmt(e.diff)} | {ci} | {e.b} "
            f"| {e.c} | {e.test} | {fmt(e.p_value, 4)} | {fmt(e.p_adjusted, 4)} | {e.family or 'single test'} "
            f"| {div[0]} | {div[1]} | {div[2]} |"
        )
    lines += [""] + [f"* `{e.name}`: action divergence n/a: {e.divergence_reason}." for e in beh.effects
                     if e.divergence_reason] + [f"* `{e.name}`: compared UNPAIRED ({e.unpaired_reason}): Fisher's "
                     "exact test on the pooled outcomes, no McNemar." for e in beh.effects if not e.paired]
    if beh.pro_prompts:
        lines += ["", "LIBERO-PRO prompts: the prompt sent against the instruction the checkpoint was trained with "
                  "(a perturbation whose text also differs is a rewording too):", "",
                  "| condition | task | prompt sent | trained instruction | same text |", "|---|---|---|---|---|"]
        lines += [f"| `{r['condition']}` | {r['task_id']} | {r['prompt_sent']} | {r['trained_instruction']} "
                  f"| {'not recorded' if r['same_text'] is None else r['same_text']} |" for r in beh.pro_prompts]
    lines += [
        "",
        f"![condition × task]({heatmap})",
        "",
        "Heatmap: per condition (row) and task (column), condition success rate minus the paired baseline's, over "
        "that task's paired episodes (init states).",
        "",
    ]
    if layers:
        lines += [
            f"![per layer]({layers})",
            "",
            "Per-layer curves (layer sweep: one condition per layer): left, Δ success (mean over tasks; band: 95% t "
            "interval over tasks where there are two or more); right, mean action divergence over "
            "paired inferences.",
            "",
        ]
    lines += [
        "Definitions:",
        "",
        "* **Δ success**: mean over tasks of (condition rate − baseline rate); its interval: the 95% t interval over "
        "the per-task differences (t with K − 1 df; honest at few tasks; n/a below two tasks).",
        "* **McNemar p**: exact two-sided binomial test over paired episodes (init states); b = baseline success and "
        "condition failure, c = the reverse; p = min(1, 2·P[Bin(b+c, ½) ≤ min(b, c)]). Episodes are paired only "
        "when their initial simulator states are identical (init_state_hash) and their seeds equal; otherwise the "
        "condition is compared unpaired (Fisher's exact test).",
        "* **p adjusted / family**: a layer sweep's p-values corrected over the sweep (the family: every layer of one "
        f"recipe) with {beh.correction} ({'Holm–Bonferroni' if beh.correction == 'holm' else 'Benjamini–Hochberg'}); "
        "a single test is not corrected.",
        "* **action divergence**: at each paired inference, RMS over the predicted chunk [H, action dim] of the "
        "difference of the env-unit actions; mean over the paired inferences of all episodes (compared while both "
        "episodes run).",
        f"* **first divergence t**: env step of the first paired inference whose divergence exceeds "
        f"{beh.threshold:g} action units (identical inputs give exactly 0); median over the episodes that diverged.",
        "",
    ]
    if beh.notes:
        lines += ["Unpaired episodes (left out):", ""] + [f"* {n}" for n in beh.notes] + [""]
    return lines


def write_behaviour_report(beh: BehaviourAnalysis, out_dir: str | pathlib.Path) -> pathlib.Path:
    """A report.md holding the behaviour section alone (with its CSV and figures)."""
    out = pathlib.Path(out_dir)
    lines = ["# Behaviour under closed-loop conditions", "", *behaviour_section(beh, out)]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
