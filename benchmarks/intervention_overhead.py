"""Intervention overhead: `Pi0.sample_actions(..., intervention=...)` relative to the plain `sample_actions`.

For each model config, times (median over interleaved repeats, after compilation) of:
  * sample_actions                     — the plain model
  * steer expert 0, one layer          — `steer(0, "text", (depth // 2,), v, alpha)` (prefix pass, once)
  * steer expert 1, one layer          — `steer(1, "actions", (depth // 2,), v, alpha)` (every denoising step)
  * knockout every query -> text       — `knockout_attention("all", "text")` in every layer, prefix and steps
and reports each as a ratio to sample_actions: of median wall times, and of median CPU times of this process (all
threads), which other jobs on a shared machine disturb less. Target: each stays within 1.05.

    uv run python benchmarks/intervention_overhead.py                   # dummy + mid configs
    uv run python benchmarks/intervention_overhead.py --configs mid     # the issue's reference config
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import numpy as np
import tyro
from capture_overhead import CONFIGS, _observation

from openpi.models import intervention as iv
from openpi.models.pi0_config import Pi0Config


@dataclasses.dataclass
class Args:
    configs: tuple[str, ...] = ("dummy", "mid")
    repeats: int = 7
    num_steps: int = 10
    out: pathlib.Path = pathlib.Path("benchmarks/results/intervention_overhead.json")


def _interventions(config: Pi0Config) -> dict[str, iv.Intervention]:
    rng = np.random.default_rng(0)
    mid = config.depth // 2
    v0 = rng.normal(size=config.paligemma_config.width).astype(np.float32)
    v1 = rng.normal(size=config.action_expert_config.width).astype(np.float32)
    return {
        "steer expert 0, one layer": iv.steer(0, "text", (mid,), v0, alpha=4.0),
        "steer expert 1, one layer": iv.steer(1, "actions", (mid,), v1, alpha=4.0),
        "knockout every query -> text": iv.knockout_attention("all", "text"),
    }


def _bench_config(name: str, config: Pi0Config, args: Args) -> dict:
    # Random weights created directly in the compute dtype (as a bf16 checkpoint is loaded), without a float32 copy.
    params = jax.jit(lambda rng: jax.tree.map(lambda x: x.astype(config.dtype), config.init_params(rng)))(
        jax.random.key(0)
    )
    model = config.load(params)
    obs = _observation(config)
    rng = jax.random.key(1)

    calls = {"sample_actions": lambda: model.sample_actions(rng, obs, num_steps=args.num_steps)}
    for label, intervention in _interventions(config).items():
        calls[label] = lambda i=intervention: model.sample_actions(rng, obs, num_steps=args.num_steps, intervention=i)

    for fn in calls.values():  # compile
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(args.repeats):  # interleave so that load changes hit every variant alike
        for label, fn in calls.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            times[label].append(time.perf_counter() - start)
            cpu[label].append(time.process_time() - start_cpu)
    base, base_cpu = statistics.median(times["sample_actions"]), statistics.median(cpu["sample_actions"])
    rows = {
        label: {
            "median_s": statistics.median(t),
            "ratio": statistics.median(t) / base,
            # CPU time of this process (all threads): less disturbed by other jobs on a shared machine.
            "median_cpu_s": statistics.median(cpu[label]),
            "cpu_ratio": statistics.median(cpu[label]) / base_cpu,
            "all_s": t,
            "all_cpu_s": cpu[label],
        }
        for label, t in times.items()
    }
    return {"config": name, "describe": config.describe(), "dtype": config.dtype, "results": rows}


def main(args: Args) -> None:
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
    }
    report = {"machine": machine, "num_steps": args.num_steps, "repeats": args.repeats, "configs": []}
    for name in args.configs:
        if name not in CONFIGS:
            raise SystemExit(f"Unknown config {name!r}; choose from {sorted(CONFIGS)}.")
        print(f"== {name}: {CONFIGS[name].describe()}", flush=True)
        result = _bench_config(name, CONFIGS[name], args)
        report["configs"].append(result)
        for label, row in result["results"].items():
            print(
                f"  {label:30s} wall {row['median_s'] * 1e3:8.1f} ms  ratio {row['ratio']:.3f}   "
                f"cpu {row['median_cpu_s'] * 1e3:8.1f} ms  ratio {row['cpu_ratio']:.3f}",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
