"""Causal maps over many observation pairs: per-site means with cluster-bootstrap intervals, storage and heatmaps.

Pure numpy / matplotlib (no jax): `aggregate` takes the per-pair score arrays of `openpi.models.patch_map.PairMap`,
`save` writes ``causal_map.npz`` (every pair's scores and the summaries) and ``causal_map.json`` (definitions, counts,
one-line readings), `plot` the heatmaps. Resampling unit: the episode (the rollout steps of one episode are not
independent); `n_boot` resamples of the episodes, 95% percentile interval of the mean over observations.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np

DEFINITION = (
    "transfer = 1 - |a_patched - a_source| / |a_run - a_source| over the model-space action chunk (Frobenius norm); "
    "denoise: run = corrupted prompt, source = clean prompt (1 = the clean action restored, 0 = nothing restored); "
    "noise: run = clean, source = corrupted (1 = the site's corruption alone carries the whole effect)"
)
POINT_LABELS = {
    "0/residual": "expert 0 residual",
    "0/attn_out": "expert 0 attention out",
    "0/mlp_out": "expert 0 MLP out",
    "1/residual": "expert 1 residual",
    "1/attn_out": "expert 1 attention out",
    "1/mlp_out": "expert 1 MLP out",
    "1/kv": "expert 1 reads K/V",
}


def cluster_bootstrap(values: np.ndarray, clusters: Sequence, n_boot: int = 1000, seed: int = 0):
    """(mean, low, high) over axis 0 of `values` [n, ...] (NaN rows left out), resampling whole clusters."""
    values = np.asarray(values, float)
    ids = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
    cl = np.array([ids[c] for c in clusters])
    k = len(ids)
    sums = np.stack([np.nansum(values[cl == i], axis=0) for i in range(k)])
    counts = np.stack([np.sum(~np.isnan(values[cl == i]), axis=0) for i in range(k)])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums.sum(0) / counts.sum(0)
        draws = np.random.default_rng(seed).integers(0, k, size=(n_boot, k))
        boot = sums[draws].sum(1) / counts[draws].sum(1)
    low, high = np.nanpercentile(boot, [2.5, 97.5], axis=0) if k > 1 else (np.full_like(mean, np.nan),) * 2
    return mean, low, high


def aggregate(pair_maps: list, clusters: Sequence, n_boot: int = 1000) -> dict:
    """Per direction: {key: {"values" [n, ...], "mean", "low", "high"}}, paths likewise, Spearman per pair."""
    out = {}
    for direction in dict.fromkeys(m.direction for m in pair_maps):
        maps = [m for m in pair_maps if m.direction == direction]
        cl = [c for m, c in zip(pair_maps, clusters, strict=True) if m.direction == direction]
        entry = {"maps": {}, "paths": {}, "n_pairs": len(maps), "n_nan": sum(m.reason is not None for m in maps)}
        entry["reasons"] = sorted({m.reason for m in maps if m.reason})
        for key in maps[0].maps:
            values = np.stack([m.maps[key] for m in maps])
            entry["maps"][key] = dict(zip(("mean", "low", "high"), cluster_bootstrap(values, cl, n_boot))) | {
                "values": values
            }
        for key in maps[0].paths:
            values = np.array([m.paths[key] for m in maps])
            entry["paths"][key] = dict(zip(("mean", "low", "high"), map(float, cluster_bootstrap(values, cl, n_boot))))
        entry["everything"] = [m.everything for m in maps]
        entry["effect"] = [m.effect for m in maps]
        if all(m.attribution is not None for m in maps):
            entry["spearman"] = [spearman(m) for m in maps]
            entry["attribution"] = {k: np.stack([m.attribution[k] for m in maps]).mean(0) for k in maps[0].maps}
        out[direction] = entry
    return out


def spearman(pair_map) -> float:
    """Rank correlation over every site between exact patching and attribution patching (NaN sites left out)."""
    from scipy.stats import spearmanr

    keys = sorted(pair_map.maps)
    exact = np.concatenate([pair_map.maps[k].ravel() for k in keys])
    approx = np.concatenate([pair_map.attribution[k].ravel() for k in keys])
    ok = ~np.isnan(exact) & ~np.isnan(approx)
    return float(spearmanr(exact[ok], approx[ok]).statistic) if ok.sum() > 2 else float("nan")


def reading(key: str, stats: dict) -> str:
    """One line: where the site's mean transfer peaks, with its interval."""
    mean = stats["mean"]
    if np.all(np.isnan(mean)):
        return f"{key}: no finite score (every pair NaN)"
    idx = np.unravel_index(np.nanargmax(mean), mean.shape)
    where = f"layer {idx[-1]}" + (f", denoising step {idx[0]}" if len(idx) == 2 else "")
    lo, hi = stats["low"][idx], stats["high"][idx]
    return f"{key}: peak {mean[idx]:.2f} [{lo:.2f}, {hi:.2f}] at {where}; mean over sites {np.nanmean(mean):.2f}"


def save(out_dir: pathlib.Path, summary: dict, meta: dict) -> dict:
    """Writes causal_map.npz and causal_map.json; returns the json content."""
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays, doc = {}, {"definition": DEFINITION, **meta, "directions": {}}
    for direction, entry in summary.items():
        d = {k: entry[k] for k in ("n_pairs", "n_nan", "reasons", "everything", "effect")}
        d["paths"] = entry["paths"]
        d["readings"] = [reading(k, s) for k, s in entry["maps"].items()]
        if "spearman" in entry:
            d["spearman_exact_vs_attribution"] = entry["spearman"]
        for key, stats in entry["maps"].items():
            for stat, value in stats.items():
                arrays[f"{direction}/{key}/{stat}"] = value
            if "attribution" in entry:
                arrays[f"{direction}/{key}/attribution"] = entry["attribution"][key]
        doc["directions"][direction] = d
    np.savez_compressed(out_dir / "causal_map.npz", **arrays)
    text = json.dumps(doc, indent=1, default=lambda v: None if v != v else v)
    (out_dir / "causal_map.json").write_text(text.replace("NaN", "null") + "\n")
    return doc


def plot(out_dir: pathlib.Path, summary: dict) -> list[str]:
    """One PNG per direction and statistic ("mean", "width" = high - low): a panel per point × token group, layer ×
    denoising step (expert 0: one row, it runs once per inference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for direction, entry in summary.items():
        rows: dict[str, list[str]] = {}
        for key in entry["maps"]:
            point, group = key.rsplit("/", 1)
            rows.setdefault(point, []).append(group)
        ncols = max(len(g) for g in rows.values())
        for stat in ("mean", "width"):
            fig, axes = plt.subplots(len(rows), ncols, figsize=(2.4 * ncols, 1.9 * len(rows)), squeeze=False,
                                     constrained_layout=True)  # fmt: skip
            for i, (point, groups) in enumerate(rows.items()):
                for j in range(ncols):
                    ax = axes[i, j]
                    if j >= len(groups):
                        ax.axis("off")
                        continue
                    stats = entry["maps"][f"{point}/{groups[j]}"]
                    value = stats["mean"] if stat == "mean" else stats["high"] - stats["low"]
                    value = np.atleast_2d(value)
                    im = ax.imshow(value, aspect="auto", cmap="RdBu_r" if stat == "mean" else "viridis",
                                   vmin=-1 if stat == "mean" else 0, vmax=1, interpolation="nearest")  # fmt: skip
                    ax.set_title(f"{POINT_LABELS.get(point, point)}: {groups[j]}", fontsize=6)
                    ax.set_xlabel("layer", fontsize=6)
                    ax.set_xticks(range(value.shape[1]))
                    if value.shape[0] > 1:
                        ax.set_ylabel("denoising step", fontsize=6)
                    else:
                        ax.set_yticks([])
                    ax.tick_params(labelsize=5)
            fig.colorbar(im, ax=axes, shrink=0.6, label="transfer" if stat == "mean" else "95% interval width")
            fig.suptitle(f"causal map ({direction}), {stat} over {entry['n_pairs']} pairs", fontsize=8)
            name = f"causal_map_{direction}{'' if stat == 'mean' else '_interval'}.png"
            fig.savefig(out_dir / name, dpi=110)
            plt.close(fig)
            files.append(name)
    return files
