"""Throughput of the parallel collection: sequential vs ``--num-envs N`` (batched and exact) vs ``--backend ray``.

Tiny preset (random weights), libero_goal `--task-ids` (default 0 and 1: as many tasks as envs, so each env runs
one task's episodes and no reset is replayed, as in a suite-wide collection; `--task-ids 0` splits one task into
blocks and reports the replay), `--episodes` episodes per task of `--max-steps` env steps, the default
CaptureSpec streamed to a real store. Every configuration runs the same episodes end to end through
`collection.collect` (env creation / worker start-up and the reset replay included; the in-process policy is built and
compiled for batch sizes 1..N before any timing, a Ray policy actor loads and compiles its own inside the timing).
Reported per configuration:

* episodes per hour = episodes / wall time x 3600; env steps per second = sum of the episodes' env steps / wall time;
* the speed-up over the sequential run; whether the store equals the sequential store bit for bit (exact modes);
* the env workers' peak RSS after each episode (flat = no growth), the time spent replaying resets;
* the machine's 1-minute load average before and after (other jobs share this machine);
* CPU seconds of this process (policy, recording, store writer; and the env in the sequential run) and of its env
  worker processes, and the floor they put under the wall time on this machine's cores, ``cpu_total / cores``: when
  the wall time sits at that floor the cores are saturated and only less CPU work per episode can go faster (Ray's
  processes are not this process's children: its CPU is not counted);
* a memory run: 2 env workers, each running `--rss-episodes` episodes of one task in one env; the growth of each
  worker's peak RSS after its first episode (target: flat, <= 5%).

Component costs for the throughput estimate of a bigger machine: one LIBERO env's step time (50 steps of zero
actions after a reset, in this process) and the tiny policy's latency at batch 1 and N.

    uv run python benchmarks/parallel_collection.py                      # ~12 min on 2 quiet CPU cores
    uv run python benchmarks/parallel_collection.py --task-ids 0 --episodes 6 --no-ray   # one task: reset replay

Writes benchmarks/results/parallel_collection.json and prints a table.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import pathlib
import platform
import resource
import shutil
import tempfile
import time
from typing import Any

import ml_dtypes
import numpy as np
import tyro

from openpi import envs
from openpi.latents import collect as collection
from openpi.latents import store
from openpi.policies import batching
from openpi.shared import cli

RESULTS = pathlib.Path(__file__).parent / "results" / "parallel_collection.json"


@dataclasses.dataclass(frozen=True)
class Args:
    episodes: int = 4  # per task and configuration (initial states 0..episodes-1)
    task_ids: tuple[int, ...] = (0, 1)  # libero_goal tasks
    max_steps: int = 50  # env steps per episode
    num_envs: int = 2
    ray: bool = True  # also run --backend ray on a local Ray instance
    ray_num_cpus: int = 2
    keep: bool = False  # keep the stores (printed paths)
    throughput: bool = True  # the sequential / parallel / Ray comparison
    # Then the env workers' memory: --num-envs 2 on tasks 0 and 1, this many 20-step episodes each (one env per
    # worker, no reset replay); peak RSS after each episode. 0: skip.
    rss_episodes: int = 5


class _StatsCatcher(logging.Handler):
    def __init__(self):
        super().__init__()
        self.stats = None

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "parallel_stats"):
            self.stats = record.parallel_stats


def _args(root: pathlib.Path, a: Args, **overrides) -> collection.CollectionArgs:
    return collection.CollectionArgs(
        preset="pi0_libero_tiny",
        task_suite="libero_goal",
        task_ids=a.task_ids,
        episodes_per_task=a.episodes,
        max_steps=a.max_steps,
        output_dir=root,
        **overrides,
    )


def _same_store(a: pathlib.Path, b: pathlib.Path, task_ids: tuple[int, ...], episodes: int) -> bool:
    for task_id, k in itertools.product(task_ids, range(episodes)):
        ea, eb = store.open_store(a).episode(task_id, k), store.open_store(b).episode(task_id, k)
        ma, mb = dict(ea.metadata), dict(eb.metadata)
        ma.pop("wall_time_s"), mb.pop("wall_time_s")
        if ma != mb or sorted(ea.keys()) != sorted(eb.keys()):
            return False
        for key in eb.keys():
            va, vb = ea.read(key), eb.read(key)
            if va.dtype == ml_dtypes.bfloat16:
                va, vb = va.view(np.uint16), vb.view(np.uint16)
            if va.shape != vb.shape or not np.array_equal(va, vb):
                return False
    return True


def _run(name: str, args: collection.CollectionArgs, policy, catcher: _StatsCatcher) -> dict[str, Any]:
    catcher.stats = None
    load_before = os.getloadavg()[0]
    cpu_self, cpu_children = _cpu_s(resource.RUSAGE_SELF), _cpu_s(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    outcomes = collection.collect(args, policy=policy)
    wall = time.perf_counter() - start
    cpu_self, cpu_children = _cpu_s(resource.RUSAGE_SELF) - cpu_self, _cpu_s(resource.RUSAGE_CHILDREN) - cpu_children
    steps = sum(o.total_steps for o in outcomes)
    row = {
        "name": name,
        "wall_s": round(wall, 1),
        "episodes": len(outcomes),
        "env_steps": steps,
        "episodes_per_hour": round(len(outcomes) / wall * 3600, 1),
        "env_steps_per_s": round(steps / wall, 2),
        "load_avg_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "cpu_s": {"this_process": round(cpu_self, 1), "env_workers": round(cpu_children, 1)},
        # The wall time can not go below the CPU work spread over every core.
        "cpu_floor_s": round((cpu_self + cpu_children) / os.cpu_count(), 1),
    }
    if catcher.stats is not None:
        row["replay_s"] = round(catcher.stats.replay_s, 1)
        row["batch_sizes"] = dict(catcher.stats.batch_sizes)
        row["worker_peak_rss_mib"] = [[round(r) for r in v] for v in catcher.stats.peak_rss_mib.values()]
    print(f"{name}: {row}", flush=True)
    return row


def _cpu_s(who: int) -> float:
    """User + system CPU seconds of this process (all threads) or of its reaped child processes."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _component_costs(policy, num_envs: int) -> dict[str, float]:
    """One env's step time and the tiny policy's latency at batch 1 and `num_envs` (after compilation)."""
    sim = envs.get("libero")
    sim.configure()
    task = sim.get_task("libero_goal", 0)
    with sim.make_env(task, sim.default_seed) as env:
        start = time.perf_counter()
        obs = env.reset(0)
        reset_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(50):
            obs, *_ = env.step(np.zeros(7))
        step_s = (time.perf_counter() - start) / 50
        element = env.policy_input(obs, task.language)
    inference = batching.BatchedInference(policy)
    capture = collection.CollectionArgs().capture
    out = {"env_reset_s": round(reset_s, 2), "env_step_ms": round(step_s * 1000, 1)}
    for b in sorted({1, num_envs}):
        requests = [batching.Request(element)] * b
        inference.run(requests, capture)  # compiled
        start = time.perf_counter()
        for _ in range(5):
            inference.run(requests, capture)
        out[f"tiny_inference_ms_batch{b}"] = round((time.perf_counter() - start) / 5 * 1000, 1)
    return out


def _machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"


def _rss_run(a: Args, base: pathlib.Path, policy, catcher: _StatsCatcher) -> dict[str, Any]:
    args = dataclasses.replace(
        _args(base / "rss", a, num_envs=2), task_ids=(0, 1), episodes_per_task=a.rss_episodes, max_steps=20
    )
    row = _run(f"memory: 2 workers x {a.rss_episodes} episodes", args, policy, catcher)
    peaks = row["worker_peak_rss_mib"]
    row["rss_growth_after_first_pct"] = [round((max(p[1:]) / p[0] - 1) * 100, 1) for p in peaks if len(p) > 1]
    return row


def main(a: Args) -> None:
    cli.configure_logging()
    catcher = _StatsCatcher()
    logging.getLogger("openpi.latents.collect.parallel").addHandler(catcher)
    base = pathlib.Path(tempfile.mkdtemp(prefix="parallel_bench_"))
    plan = collection.make_plan(_args(base / "x", a))
    from openpi.latents.collect.run import load_policy

    policy = load_policy(plan)
    if not a.throughput:
        result = {"machine": _machine(), "config": dataclasses.asdict(a), "memory": _rss_run(a, base, policy, catcher)}
        out = RESULTS.with_name("parallel_collection_memory.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {out}")
        shutil.rmtree(base, ignore_errors=True)
        return
    costs = _component_costs(policy, a.num_envs)  # also compiles batch sizes 1 and N for the runs
    print("component costs:", costs, flush=True)
    rows = [_run("sequential", _args(base / "seq", a), policy, catcher)]
    n = a.num_envs
    exact = _args(base / "exact", a, num_envs=n, batch_inference=False)
    rows.append(_run(f"num_envs={n} --no-batch-inference", exact, policy, catcher))
    rows[-1]["store_equals_sequential"] = _same_store(base / "exact", base / "seq", a.task_ids, a.episodes)
    rows.append(_run(f"num_envs={n} batched", _args(base / "batched", a, num_envs=n), policy, catcher))
    if a.ray:
        from openpi.latents.collect.ray_backend import import_ray

        ray = import_ray()

        ray.init(num_cpus=a.ray_num_cpus, include_dashboard=False, logging_level="WARNING")
        try:
            ray_args = _args(base / "ray", a, num_envs=n, batch_inference=False, backend="ray")
            rows.append(_run(f"ray local ({a.ray_num_cpus} CPUs), num_envs={n} exact", ray_args, policy, catcher))
            rows[-1]["store_equals_sequential"] = _same_store(base / "ray", base / "seq", a.task_ids, a.episodes)
        finally:
            ray.shutdown()
    memory = _rss_run(a, base, policy, catcher) if a.rss_episodes else None
    for row in rows:
        row["speedup_vs_sequential"] = round(row["episodes_per_hour"] / rows[0]["episodes_per_hour"], 2)
    result = {
        "machine": _machine(),
        "config": dataclasses.asdict(a),
        "component_costs": costs,
        "runs": rows,
        "memory": memory,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    header = f"{'configuration':45s} {'wall s':>7} {'ep/h':>7} {'steps/s':>8} {'x seq':>6} {'load':>11}"
    print(f"\n{header} {'CPU here+workers':>17} {'floor s':>8}  same")
    for r in rows:
        load = f"{r['load_avg_1min'][0]}->{r['load_avg_1min'][1]}"
        same = r.get("store_equals_sequential", "-")
        cpu = f"{r['cpu_s']['this_process']}+{r['cpu_s']['env_workers']}"
        print(
            f"{r['name']:45s} {r['wall_s']:>7} {r['episodes_per_hour']:>7} {r['env_steps_per_s']:>8} "
            f"{r['speedup_vs_sequential']:>6} {load:>11} {cpu:>17} {r['cpu_floor_s']:>8}  {same}"
        )
    print(f"\nWrote {RESULTS}")
    if not a.keep:
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"Stores in {base}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
