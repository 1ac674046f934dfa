"""Causal-map speed (issue 21 deliverable 7): exact activation patching vs attribution patching, on the mid config.

One observation pair of capture_overhead.py's "mid" config (random weights in its compute dtype, 10 denoising steps,
two cameras present: 512 image tokens + 12 text tokens) differing in the text tokens only. Times after compilation,
median over `repeats`:

  * one inference           — `Pi0.sample_actions` (batch one)
  * record                  — `patching.record` (the sources: every point's values), at the chunk's batch
  * exact, expert-0 chunk   — one `patched_actions` call of `chunk` sites that patch expert 0 (prefix recomputed)
  * exact, expert-1 chunk   — one call of `chunk` expert-1 sites (the run's recorded prefix reused)
  * attribution             — `patching.attribution`: one forward + backward pass for every site at once

From these: sites/s of each, the full map's site count and its estimated time (2 records + the chunks of each
program + the path sites) relative to one inference. `--full-map` also runs the real `patch_map.pair_map` once and
times it end to end (minutes on 2 CPUs).

    uv run python benchmarks/causal_map.py
    uv run python benchmarks/causal_map.py --configs full --chunk 32    # on an accelerator
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from capture_overhead import CONFIGS, _observation

from openpi.models import patch_map, patching


@dataclasses.dataclass
class Args:
    configs: tuple[str, ...] = ("mid",)
    chunk: int = 16
    repeats: int = 3
    num_steps: int = 10
    full_map: bool = False
    out: pathlib.Path = pathlib.Path("benchmarks/results/causal_map.json")


def _time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _bench(name: str, args: Args) -> dict:
    config = CONFIGS[name]
    params = jax.jit(lambda rng: jax.tree.map(lambda x: x.astype(config.dtype), config.init_params(rng)))(
        jax.random.key(0)
    )
    model = config.load(params)
    clean = _observation(config)
    corrupt = dataclasses.replace(clean, tokenized_prompt=np.where(clean.tokenized_prompt_mask, 7, 0).astype(np.int32))
    noise = jnp.asarray(np.random.default_rng(1).standard_normal((1, config.action_horizon, config.action_dim)),
                        jnp.float32)  # fmt: skip
    s, n = args.num_steps, args.chunk
    a = patching.record(model, clean, noise, num_steps=s, rows=n)
    b = patching.record(model, corrupt, noise, num_steps=s, rows=n)
    g0, g1 = patch_map.prefix_groups(config, a["prefix_mask"]), patch_map.suffix_groups(config)
    sites = patch_map.map_sites(config, g0, g1, s)
    paths = patch_map.path_sites(config, g0, s)
    e0 = [x for x in sites if x.expert == 0]
    e1 = [x for x in sites if x.expert == 1] + list(paths.values())
    w0 = {k: jnp.asarray(v) for k, v in patch_map.site_weights(config, e0[:n], g0, g1, s, patching.POINTS).items()}
    w1 = {k: jnp.asarray(v) for k, v in patch_map.site_weights(config, e1[:n], g0, g1, s, patching.POINTS[3:]).items()}
    t = {
        "inference": _time(
            lambda: model.sample_actions(jax.random.key(0), clean, noise=noise, num_steps=s), args.repeats
        ),
        "record": _time(lambda: patching.record(model, clean, noise, num_steps=s, rows=n), args.repeats),
        "exact_expert_0_chunk": _time(
            lambda: patching.patched_actions(model, corrupt, noise, w0, a["sources"], num_steps=s), args.repeats
        ),
        "exact_expert_1_chunk": _time(
            lambda: patching.patched_actions(model, corrupt, noise, w1, a["sources"], b["sources"]["1/kv"],
                                             num_steps=s, reuse_prefix=True), args.repeats  # fmt: skip
        ),
        "attribution": _time(
            lambda: patching.attribution(model, corrupt, noise, a["sources"], a["actions"], b["actions"], num_steps=s),
            args.repeats,
        ),
    }
    chunks0, chunks1 = math.ceil((len(e0) + 2) / n), math.ceil((len(e1) + 1) / n)
    full = 2 * t["record"] + chunks0 * t["exact_expert_0_chunk"] + chunks1 * t["exact_expert_1_chunk"]
    out = {
        "config": name,
        "chunk": n,
        "sites": {"expert_0": len(e0), "expert_1_and_paths": len(e1), "total": len(e0) + len(e1)},
        "seconds": t,
        "sites_per_s": {
            "exact_expert_0": n / t["exact_expert_0_chunk"],
            "exact_expert_1": n / t["exact_expert_1_chunk"],
            "exact_overall": (len(e0) + len(e1)) / full,
            "attribution": len(sites) / t["attribution"],
        },
        "full_map_estimate_s": full,
        "full_map_over_inference": full / t["inference"],
        "attribution_over_inference": t["attribution"] / t["inference"],
    }
    if args.full_map:
        start = time.perf_counter()
        patch_map.pair_map(model, clean, corrupt, noise, num_steps=s, chunk=n)
        out["full_map_measured_s"] = time.perf_counter() - start
    return out


def main(args: Args) -> None:
    results = {"machine": f"{platform.machine()}, {jax.devices()[0].device_kind}, {len(jax.devices())} device(s)",
               "results": [_bench(name, args) for name in args.configs]}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(tyro.cli(Args))
