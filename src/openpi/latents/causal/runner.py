"""Causal maps of a stored collection (or of given pairs): the map of every pair, aggregated, written, plotted.

`CausalMapArgs` / `run_causal_maps` are `scripts/causal_map.py`. The collection's stored observations and noise are
replayed through its own model (the replay's plan and checks: `openpi.latents.replay.make_plan`), each paired with
its corrupted prompt; `map_pairs` is the same for live pairs (`pairs.make_pair`).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
import time

import jax.numpy as jnp

from openpi.latents.causal import maps as _maps
from openpi.latents.causal import pairs as _pairs
from openpi.models import patch_map

logger = logging.getLogger(__name__)
_RANDOM = re.compile(r"random\(seed=(\d+)\)")


@dataclasses.dataclass(frozen=True)
class CausalMapArgs:
    # The latent store whose observations (stored images, state, prompt, noise) are replayed.
    collection: str
    # Where the maps go (causal_map.json / .npz / PNGs). Beside a report: <report dir>/causal_map, which the report
    # then shows (write the report into the same <report dir>).
    output_dir: str
    # The corrupted prompt: "other-task" (another task's prompt of the collection), "blank", or a given text.
    corrupt: str = "other-task"
    # "denoise" (patch clean into corrupted: restoration) and / or "noise" (corrupted into clean).
    directions: tuple[str, ...] = ("denoise",)
    # The model to map; None: the collection's own (its manifest's checkpoint or random seed).
    checkpoint: str | None = None
    # At most this many stored rollout steps (observations), every `every`-th step of each episode.
    max_observations: int = 8
    every: int = 1
    # Patched runs per batched call (one compile per program; larger is faster on an accelerator).
    chunk: int = 16
    # Also attribution patching (gradient) and its Spearman rank correlation with the exact map, per pair.
    attribution: bool = True
    # Leading action dims compared (7: LIBERO's; None: every model dim).
    action_dims: int | None = 7
    n_boot: int = 1000


def check_args(args: CausalMapArgs) -> None:
    bad = [d for d in args.directions if d not in patch_map.DIRECTIONS]
    if bad or not args.directions:
        raise ValueError(f"--directions {list(args.directions)}: use one or both of {patch_map.DIRECTIONS}.")
    for name in ("max_observations", "every", "chunk"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")


def _plan(args: CausalMapArgs):
    from openpi.latents import replay, store

    recorded = store.open_store(args.collection).run_manifest.checkpoint
    ckpt, seed = args.checkpoint, 1
    if ckpt is None:
        m = _RANDOM.fullmatch(str(recorded or ""))
        ckpt, seed = (None, int(m.group(1))) if m else (recorded, 1)
    rargs = replay.ReplayArgs(
        source=args.collection, output_dir=str(pathlib.Path(args.output_dir) / "unused"), checkpoint=ckpt,
        init_seed=seed, allow_same_model=True,
    )  # fmt: skip
    return replay.make_plan(rargs)


def map_pairs(policy, pair_list, args: CausalMapArgs, clusters, meta: dict) -> dict:
    """The maps of `pair_list` (`pairs.Pair`), aggregated (clusters: the resampling unit of each pair) and written."""
    num_steps = policy.sample_kwargs.get("num_steps", 10)
    results, cl, start = [], [], time.monotonic()
    for pair, c in zip(pair_list, clusters, strict=True):
        for direction in args.directions:
            results.append(
                patch_map.pair_map(
                    policy.model, pair.clean, pair.corrupt, jnp.asarray(pair.noise), num_steps=num_steps,
                    direction=direction, chunk=args.chunk, dims=args.action_dims, attribution=args.attribution,
                )
            )  # fmt: skip
            cl.append(c)
    summary = _maps.aggregate(results, cl, args.n_boot)
    out = pathlib.Path(args.output_dir)
    meta = meta | {"num_denoise_steps": num_steps, "seconds": round(time.monotonic() - start, 1)}
    doc = _maps.save(out, summary, meta)
    doc["figures"] = _maps.plot(out, summary)
    return doc


def run_causal_maps(args: CausalMapArgs) -> dict:
    """The CLI: checks, the plan (before the model loads), the pairs, the maps."""
    from openpi.latents import replay

    check_args(args)
    plan = _plan(args)
    observations = list(_pairs.stored_observations(plan, args.max_observations, args.every))
    prompts = sorted({str(plan.source.episode(t, k).read_step_value("prompt", 0)) for t, k in plan.episodes})
    policy = replay.load_policy(plan)
    pair_list = [
        _pairs.make_pair(policy, o.raw, _pairs.corrupted_prompt(o.raw["prompt"], args.corrupt, prompts), o.noise)
        for o in observations
    ]
    meta = {
        "collection": str(args.collection),
        "model": plan.manifest.checkpoint,
        "corrupt": args.corrupt,
        "pairs": [
            {"task_id": o.task_id, "episode": o.episode, "step": o.step, "clean": p.clean_prompt,
             "corrupt": p.corrupt_prompt} for o, p in zip(observations, pair_list, strict=True)
        ],  # fmt: skip
        "n_tasks": len({o.task_id for o in observations}),
        "n_episodes": len({(o.task_id, o.episode) for o in observations}),
        "resampling_unit": "episode",
        "corrupt_layout": "the corrupted prompt's tokens fitted to the clean prompt's valid positions (content "
        "truncated, or padded with the visible pad id between BOS and the trailing newline)",
    }
    logger.info("Mapping %d pairs x %s of %s", len(pair_list), args.directions, args.collection)
    return map_pairs(policy, pair_list, args, [(o.task_id, o.episode) for o in observations], meta)
