"""Attention to language in the report: the figure, the metrics.json section (``attention_by_denoise_step``) and the
tables ``attention.csv`` / ``attention_heads.csv`` (definitions: :mod:`openpi.latents.analysis.measures.attention`).

Three series, each a mean over rollout steps: the mass on the text content keys (BOS and the trailing newline left
out), that mass normalised by the text share of the keys the query may attend to (uniform attention = 1), and the mass
on BOS. pi0's state query is shown once per layer, not per denoising step: its attention is identical at every step
by construction (the measured largest deviation is reported beside it).
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from openpi.latents.analysis.run.result import CollectionAnalysis, attention_means, quiet_nan_warnings
from openpi.latents.report import control as C
from openpi.latents.report.plots import _figure, _layer_label, _note
from openpi.latents.report.statistics import STATE_TOKEN_NOTE

SERIES = {
    "text": "attention mass on the text content keys (valid text keys without BOS and the last valid one, pi0's "
    "trailing newline; every valid text key when the analysis ran with include_constant_tokens)",
    "normalised": "that mass divided by the query's share of visible keys that are text content keys (per query, "
    "layer and head: its attention mask, knockouts included); uniform attention over the visible keys = 1",
    "bos": "attention mass on BOS (the first valid text key; the same for every prompt, a likely attention sink)",
}


ROLES = {
    True: "query 0 = pi0's state token, queries 1: = action tokens",
    False: "every query is an action token (pi0.5: no state token)",
}


def _ids(res: CollectionAnalysis, n: int) -> list[int]:
    ids = res.attention.get("denoise_steps")
    return list(range(n)) if ids is None else [int(i) for i in ids]


def _state_query(res: CollectionAnalysis) -> bool:
    return "expert_1" in res.streams and res.streams["expert_1"].state_query


def attention_figure(res: CollectionAnalysis, out: pathlib.Path) -> dict[str, Any]:
    """Text mass of the action queries per denoising step × layer; per layer by query (state once) with BOS; the
    normalised text mass per head × layer."""
    means = attention_means(res)
    if "actions:text" not in means:
        return _figure(
            [("attention to text not computed", _note(res.reason("expert_1", "attention_to_text") or ""))],
            out / "attention_to_text.png",
            "Attention to language",
        )
    layers = res.layers("expert_1")
    times = res.attention.get("denoise_times")
    grid = means["actions:text"]
    ids = _ids(res, grid.shape[0])
    by_id = (res.source.get("denoise_steps") or {}).get("kind") == "model"
    state = _state_query(res)

    def heat(ax):
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma", interpolation="nearest")
        ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
        ax.set_yticks(
            range(len(ids)),
            [f"{i} (t={float(times[n]):.2f})" if times is not None else str(i) for n, i in enumerate(ids)],
            fontsize=6,
        )
        ax.set_xlabel(_layer_label(res, "expert_1"))
        ax.set_ylabel("denoising step" if by_id else "denoising step (capture position)")
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)

    def per_layer(part: str, name: str) -> np.ndarray:
        with quiet_nan_warnings():  # the state query is one value per layer; the action queries a step × layer grid
            return means[f"{part}:{name}"] if part == "state" else np.nanmean(means[f"{part}:{name}"], axis=0)

    def curves(ax):
        rows = [("actions", "action queries (mean over steps)", "tab:orange")]
        if state:
            rows.insert(0, ("state", "state query (once: same every step)", "tab:purple"))
        for part, label, color in rows:
            ax.plot(layers, per_layer(part, "text"), "o-", ms=3, color=color, label=f"{label}: text")
            if f"{part}:bos" in means:
                ax.plot(layers, per_layer(part, "bos"), "s--", ms=3, color=color, alpha=0.6, label=f"{label}: BOS")
        C.draw_line(ax, res, "expert_1", C.control_attention(res), "tab:orange", "action queries: text, ")
        ax.set_xlabel(_layer_label(res, "expert_1"))
        ax.set_ylabel("attention mass", fontsize=8)
        ax.legend(fontsize=6)

    panels = [("text mass, action queries: step × layer", heat), ("text and BOS mass per layer by query", curves)]
    if "heads:normalised" in means:
        heads = means["heads:normalised"]  # [L, heads]

        def per_head(ax):
            from matplotlib.colors import TwoSlopeNorm

            with quiet_nan_warnings():  # diverging around 1, uniform attention
                lo, hi = np.nanmin(heads), np.nanmax(heads)
            norm = TwoSlopeNorm(1.0, min(lo, 0.99), max(hi, 1.01)) if np.isfinite(lo) and np.isfinite(hi) else None
            im = ax.imshow(heads.T, aspect="auto", origin="lower", cmap="coolwarm", norm=norm, interpolation="nearest")
            ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
            ax.set_xlabel(_layer_label(res, "expert_1"))
            ax.set_ylabel("head")
            ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)

        panels.append(("text mass / text share of keys, per head (1 = uniform)", per_head))
    else:
        why = res.reason("expert_1", "attention_to_text_normalised") or ""
        panels.append(("normalised text mass not computed", _note(why)))
    kept = "BOS and trailing newline excluded"
    if res.settings.get("include_constant_tokens"):
        kept = "every valid text key"
    title = f"Expert-1 attention to language (mean over rollout steps; {kept})"
    return _figure(panels, out / "attention_to_text.png", title)


def attention_json(res: CollectionAnalysis) -> dict[str, Any]:
    """metrics.json ``attention_by_denoise_step``: per series, the action queries [S, L], the state query [L] (pi0,
    once) and every head [L, heads], with the definitions; or the reason it is missing."""
    means = attention_means(res)
    if not means:
        return {"reason": res.reason("expert_1", "attention_to_text")}
    state = _state_query(res)
    stream = res.streams["expert_1"]
    out: dict[str, Any] = {
        "denoise_steps": res.attention.get("denoise_steps"),
        "denoise_step_ids": (res.source.get("denoise_steps") or {}).get("kind", "capture_position"),
        "denoise_times": res.attention.get("denoise_times"),
        "layers": res.layers("expert_1"),
        "definitions": dict(SERIES),
        "query_roles": f"{ROLES[state]} ({stream.state_query_source})",
        "state_query_note": STATE_TOKEN_NOTE,
        "excluded_keys": "BOS and the last valid text key (pi0's trailing newline)"
        if not res.settings.get("include_constant_tokens", False)
        else "none (include_constant_tokens: every valid text key)",
        "unit": "mean over rollout steps of every episode (no resampling); per layer with intervals: metrics."
        "attention_to_text / attention_to_text_normalised / attention_to_bos",
    }
    for name in SERIES:
        if f"actions:{name}" not in means:
            continue
        out[name] = {
            "action_queries": means[f"actions:{name}"],
            "state_query": means[f"state:{name}"] if state else None,
            "state_query_max_deviation_across_steps": res.attention.get(f"state_step_spread:{name}"),
            "per_head": means[f"heads:{name}"],
        }
        with quiet_nan_warnings():
            out[name]["per_head_mean"] = np.nanmean(means[f"heads:{name}"], axis=1)
    return out


def attention_rows(res: CollectionAnalysis) -> tuple[list[str], list[list], list[str], list[list]]:
    """(header, rows) of attention.csv (per denoising step and layer; the state query repeated on every step's row,
    flagged as one value) and of attention_heads.csv (per layer and head)."""
    means = attention_means(res)
    names = [n for n in SERIES if f"actions:{n}" in means]
    head = ["denoise_step", "capture_position", "t", "layer"]
    head += [f"action_queries_{n}" for n in names] + [f"state_query_{n}" for n in names]
    head_h = ["layer", "head"] + [f"all_queries_{n}" for n in names]
    if not names:
        return head, [], head_h, []
    times = res.attention.get("denoise_times")
    layers = res.layers("expert_1")
    grid = means[f"actions:{names[0]}"]
    ids = _ids(res, grid.shape[0])
    state = _state_query(res)
    rows = [
        [ids[i], i, float(times[i]) if times is not None else "", layer]
        + [means[f"actions:{n}"][i, j] for n in names]
        + [means[f"state:{n}"][j] if state else float("nan") for n in names]
        for i in range(grid.shape[0])
        for j, layer in enumerate(layers)
    ]
    n_heads = means[f"heads:{names[0]}"].shape[1]
    rows_h = [
        [layer, h] + [means[f"heads:{n}"][j, h] for n in names]
        for j, layer in enumerate(layers)
        for h in range(n_heads)
    ]
    return head, rows, head_h, rows_h
