"""Causal maps of one observation pair: exact activation patching over every site, in a bounded number of compiles.

A pair is a clean run A and a corrupted run B of the same observation and noise that differ by the prompt only, on
one token layout (`fit_prompt`: B's prompt occupies exactly A's valid text positions, so every token group, RoPE
position and attention mask is shared and a patch moves values, never positions). A *site* is (expert, point, token
group, denoising step, layer):

  expert 0: point "residual" | "attn_out" | "mlp_out", a prefix group, a layer (no step: the prefix runs once);
  expert 1: the same points over a suffix group ("state", "actions"), a step and a layer, or point "kv" over a
            prefix group (the keys / values expert 1 reads there at that step and layer: "kv" × text groups is the
            direct path of the prompt, "kv" × camera groups the indirect one, through the image tokens).

Prefix groups: each present camera's tokens, "text_content" (the valid text tokens without the first and the last),
"text_bos_newline" (BOS and pi0's trailing "\\n", the same in every prompt). Suffix groups: `suffix_segment_names`.

Score of a patched run (`patching.transfer`): 1 - |a - a_src| / |a_run - a_src| over the action chunk, the share of the
way from the run's own action (0) to the source's (1). Denoising ("denoise"): run = B, source = A (restoration);
noising ("noise"): run = A, source = B (how much of the effect one site's corruption carries). The run's own action
is the unpatched row of the same batched program, so batching never shows up as an effect; a pair whose actions
agree (|a_A - a_B| <= `min_effect` · max(1, |a_A|)) has no effect to restore: every score is NaN with that reason.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

from openpi.models import patching

if TYPE_CHECKING:
    from openpi.models.intervention import Intervention
    from openpi.models.pi0 import Pi0

DIRECTIONS = ("denoise", "noise")
TEXT_GROUPS = ("text_content", "text_bos_newline")


def fit_prompt(ids: np.ndarray, mask: np.ndarray, n_valid: int, filler: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A tokenized prompt ([T] ids, mask; BOS first, "\\n" last) refitted to `n_valid` valid tokens: its content is
    truncated, or padded with the visible `filler` id (the tokenizer's pad), between BOS and the "\\n"."""
    ids, mask = np.asarray(ids), np.asarray(mask, bool)
    valid = ids[mask]
    if n_valid < 2 or len(valid) < 2:
        raise ValueError(
            f"Cannot fit a prompt of {len(valid)} valid tokens to {n_valid}: both need BOS and a last token."
        )
    content = list(valid[1:-1][: n_valid - 2]) + [filler] * max(0, n_valid - len(valid))
    out = np.zeros_like(ids)
    out[:n_valid] = [valid[0], *content, valid[-1]]
    return out, np.arange(len(ids)) < n_valid


def prefix_groups(config, prefix_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Token groups over the prefix (bool masks [Tp]) from the pair's shared prefix mask; masked cameras left out."""
    prefix_mask = np.asarray(prefix_mask, bool).reshape(-1)
    tpc, groups = config.tokens_per_camera, {}
    for c, name in enumerate(n for n in config.segment_names if n != "text"):
        g = np.zeros(config.prefix_len, bool)
        g[c * tpc : (c + 1) * tpc] = True
        if (g & prefix_mask).any():
            groups[name] = g & prefix_mask
    text = np.zeros(config.prefix_len, bool)
    text[config.text_start :] = True
    idx = np.flatnonzero(text & prefix_mask)
    ends = np.zeros(config.prefix_len, bool)
    if len(idx):
        ends[[idx[0], idx[-1]]] = True
    groups["text_content"] = text & prefix_mask & ~ends
    groups["text_bos_newline"] = ends
    return groups


def suffix_groups(config) -> dict[str, np.ndarray]:
    names = config.suffix_segment_names
    first = np.zeros(config.suffix_len, bool)
    first[0] = True
    return {names[0]: first, names[1]: ~first} if not config.pi05 else {"actions": np.ones(config.suffix_len, bool)}


@dataclasses.dataclass(frozen=True)
class Site:
    point: str  # `patching.POINTS`
    group: str
    steps: tuple[int, ...]  # () for expert 0
    layers: tuple[int, ...]

    @property
    def expert(self) -> int:
        return patching.point_expert(self.point)


def map_sites(config, groups0: dict, groups1: dict, num_steps: int) -> list[Site]:
    """Every single-site patch of the map: expert 0 point × group × layer, expert 1 point × group × step × layer."""
    layers = range(config.depth)
    sites = [Site(p, g, (), (l,)) for p in patching.POINTS[:3] for g in groups0 for l in layers]
    for p in patching.POINTS[3:]:
        for g in groups0 if p == "1/kv" else groups1:
            sites += [Site(p, g, (s,), (l,)) for s in range(num_steps) for l in layers]
    return sites


def path_sites(config, groups0: dict, num_steps: int) -> dict[str, Site]:
    """Path decomposition: the prefix keys/values expert 1 reads, text (direct path) or images (indirect), at every
    step, per layer ("direct/3") and at every layer ("direct")."""
    steps, every = tuple(range(num_steps)), tuple(range(config.depth))
    out = {}
    for path, names in (("direct", TEXT_GROUPS), ("indirect", [g for g in groups0 if g not in TEXT_GROUPS])):
        out[path] = Site("1/kv", "+".join(names), steps, every)
        out |= {f"{path}/{l}": Site("1/kv", "+".join(names), steps, (l,)) for l in every}
    return out


def _group_mask(site: Site, groups0: dict, groups1: dict) -> np.ndarray:
    table = groups0 if site.expert == 0 or site.point == "1/kv" else groups1
    return np.any([table[g] for g in site.group.split("+")], axis=0)


def site_weights(config, sites: list[Site], groups0, groups1, num_steps: int, points) -> dict[str, np.ndarray]:
    """Dense weights [N, ...] (one row per site, 1 on the site) for `points`."""
    w = {p: np.zeros((len(sites), *patching.weight_shape(config, p, num_steps)), np.float32) for p in points}
    for n, site in enumerate(sites):
        if site.point == "*":  # every point, layer, step and token
            for p in points:
                w[p][n] = 1.0
            continue
        if site.point == "-":  # nothing: the run itself
            continue
        tokens = _group_mask(site, groups0, groups1)
        row = w[site.point][n]
        if site.expert == 0:
            row[np.ix_(site.layers, tokens)] = 1.0
        else:
            row[np.ix_(site.steps, site.layers, tokens)] = 1.0
    return w


NOTHING = Site("-", "nothing", (), ())
EVERYTHING = Site("*", "everything", (), ())


@dataclasses.dataclass(frozen=True)
class PairRecord:
    observation: object  # the run's model Observation (batch one)
    record: dict  # `patching.record`


def check_pair(clean: dict, corrupt: dict) -> None:
    a, b = np.asarray(clean["prefix_mask"]), np.asarray(corrupt["prefix_mask"])
    if not np.array_equal(a, b):
        raise ValueError(
            "The clean and corrupted runs have different prefix masks (prompts of different token lengths): fit the "
            "corrupted prompt to the clean one's layout with patch_map.fit_prompt before recording."
        )


def run_sites(
    model: Pi0, run_obs, noise, run_rec: dict, src_rec: dict, sites: list[Site], *, num_steps: int, chunk: int = 16,
    intervention: Intervention | None = None, dims: int | None = None, groups0=None, groups1=None,
) -> np.ndarray:  # fmt: skip
    """Transfer score of each site (NaN-free; see `scores`), in chunks of `chunk` rows: expert-1-only sites reuse the
    run's recorded prefix (one program), sites touching expert 0 recompute it (another): two compiles at most."""
    cfg = model.config
    groups0 = prefix_groups(cfg, run_rec["prefix_mask"]) if groups0 is None else groups0
    groups1 = suffix_groups(cfg) if groups1 is None else groups1
    src_actions = src_rec["actions"]
    out = np.full(len(sites), np.nan)
    by_program = {
        False: [i for i, s in enumerate(sites) if s.point == "*" or (s.point != "-" and s.expert == 0)],
        True: [i for i, s in enumerate(sites) if s.point == "-" or (s.point != "*" and s.expert == 1)],
    }
    for reuse, index in by_program.items():
        if not index:
            continue
        points = patching.POINTS[3:] if reuse else patching.POINTS
        todo = [NOTHING] + [sites[i] for i in index]
        actions = []
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            part = part + [NOTHING] * (chunk - len(part))  # a fixed batch: one compile per program
            w = site_weights(cfg, part, groups0, groups1, num_steps, points)
            actions.append(
                np.asarray(
                    patching.patched_actions(
                        model, run_obs, noise, {k: jnp.asarray(v) for k, v in w.items()}, src_rec["sources"],
                        run_rec["sources"]["1/kv"] if reuse else None, num_steps=num_steps,
                        intervention=intervention, reuse_prefix=reuse,
                    )
                )
            )  # fmt: skip
        actions = np.concatenate(actions)[: len(todo)]
        scores = np.asarray(patching.transfer(jnp.asarray(actions), src_actions, jnp.asarray(actions[:1]), dims))
        out[index] = scores[1:]
    return out


def effect_size(clean: dict, corrupt: dict, dims: int | None = None) -> tuple[float, float]:
    """(|a_A - a_B|, |a_A|) over the chunk."""
    d = slice(None) if dims is None else slice(0, dims)
    a, b = np.asarray(clean["actions"])[..., d], np.asarray(corrupt["actions"])[..., d]
    return float(np.linalg.norm(a - b)), float(np.linalg.norm(a))


@dataclasses.dataclass(frozen=True)
class PairMap:
    """The maps of one pair in one direction. `maps["<expert>/<point>/<group>"]`: expert 0 [L], expert 1 [S, L];
    `paths`: "direct" / "indirect" (every layer) and "<path>/<layer>"; `everything`: the score of patching every site
    at once (1.0 exactly when patching is exact); `effect`: |a_A - a_B|; `reason`: why every score is NaN, or None.
    `attribution`: the same keys as `maps`, the gradient estimate (None when not asked)."""

    direction: str
    maps: dict[str, np.ndarray]
    paths: dict[str, float]
    everything: float
    effect: float
    reason: str | None
    attribution: dict[str, np.ndarray] | None = None


def _key(site: Site) -> str:
    return f"{site.point}/{site.group}"


def _shape_maps(sites: list[Site], values, depth: int, num_steps: int) -> dict[str, np.ndarray]:
    maps = {}
    for site, v in zip(sites, values, strict=True):
        shape = (depth,) if site.expert == 0 else (num_steps, depth)
        arr = maps.setdefault(_key(site), np.full(shape, np.nan))
        arr[(site.layers[0],) if site.expert == 0 else (site.steps[0], site.layers[0])] = v
    return maps


def attribution_maps(config, grads: dict, sites: list[Site], groups0, groups1, num_steps: int) -> dict:
    """Each site's attribution estimate: the gradient summed over the site's tokens (and step, layer)."""
    values = []
    for site in sites:
        g, tokens = np.asarray(grads[site.point]), _group_mask(site, groups0, groups1)
        per = g[..., tokens].sum(-1)  # [L] or [S, L]
        values.append(per[site.layers[0]] if site.expert == 0 else per[site.steps[0], site.layers[0]])
    return _shape_maps(sites, values, config.depth, num_steps)


def pair_map(
    model: Pi0, clean_obs, corrupt_obs, noise, *, num_steps: int = 10, direction: str = "denoise",
    chunk: int = 16, intervention: Intervention | None = None, dims: int | None = None, attribution: bool = False,
    min_effect: float = 1e-6,
) -> PairMap:  # fmt: skip
    """The full map of one pair (observations with batch one, `noise` [1, H, A]); see the module docstring."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}: use one of {DIRECTIONS}.")
    cfg = model.config
    rec = dict(num_steps=num_steps, intervention=intervention, rows=chunk)  # the patched runs' batch
    clean = patching.record(model, clean_obs, noise, **rec)
    corrupt = patching.record(model, corrupt_obs, noise, **rec)
    check_pair(clean, corrupt)
    run_obs, run, src = (corrupt_obs, corrupt, clean) if direction == "denoise" else (clean_obs, clean, corrupt)
    groups0, groups1 = prefix_groups(cfg, clean["prefix_mask"]), suffix_groups(cfg)
    sites = map_sites(cfg, groups0, groups1, num_steps)
    paths = path_sites(cfg, groups0, num_steps)
    everything = [*sites, *paths.values(), EVERYTHING]
    effect, scale = effect_size(clean, corrupt, dims)
    if effect <= min_effect * max(1.0, scale):
        reason = f"clean and corrupted actions agree (|a_A - a_B| = {effect:.3g}): there is no effect to restore"
        nan = np.full(len(sites), np.nan)
        empty = _shape_maps(sites, nan, cfg.depth, num_steps)
        nan_paths = {k: np.nan for k in paths}
        return PairMap(direction, empty, nan_paths, np.nan, effect, reason, empty if attribution else None)
    scores = run_sites(
        model, run_obs, noise, run, src, everything, num_steps=num_steps, chunk=chunk, intervention=intervention,
        dims=dims, groups0=groups0, groups1=groups1,
    )  # fmt: skip
    maps = _shape_maps(sites, scores[: len(sites)], cfg.depth, num_steps)
    path_scores = dict(zip(paths, map(float, scores[len(sites) : -1]), strict=True))
    attr = None
    if attribution:
        grads = patching.attribution(
            model, run_obs, noise, src["sources"], src["actions"], run["actions"], num_steps=num_steps,
            intervention=intervention, dims=dims,
        )  # fmt: skip
        attr = attribution_maps(cfg, grads, sites, groups0, groups1, num_steps)
    return PairMap(direction, maps, path_scores, float(scores[-1]), effect, None, attr)
