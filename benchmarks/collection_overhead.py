"""End-to-end cost of recording latents during real LIBERO rollouts (tiny preset, libero_goal task 0).

One process, one env, one policy (compiled before anything is timed), so env creation and compilation are excluded
from every figure. Three measurements:

1. Wall time per episode, capture on vs off, interleaved by rounds (the order alternates each round; both variants of a
   round start from the same initial state with the same noise):
     * off: openpi's protocol with the plain `Policy.infer` (`openpi.envs.base.run_episode`), nothing recorded;
     * on:  the collection's episode (`collection.run_task_episode`) with the default `CaptureSpec`, every step
            streamed to a latent store; the time includes draining the writer queue at the end of the episode.
   Target: on / off <= 1.10 (median over rounds).
2. Peak RSS in each of 5 consecutive capture-on episodes (psutil sampler thread, 20 ms), and the growth of the later
   peaks over the first. Target: <= 5%.
3. Bytes per inference for the default spec and for `CaptureSpec.everything()`: raw (the per-step bytes of every stored
   array, latents alone and the whole record with images and actions) and on disk (store directory size / number of
   inferences), plus the raw latent bytes the same specs give for full-size pi0 (shapes only, via jax.eval_shape).

    uv run python benchmarks/collection_overhead.py                     # ~6 min on 2 CPU cores
    uv run python benchmarks/collection_overhead.py --rounds 3 --max-steps 30

Writes benchmarks/results/collection_overhead.json and prints a table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import tempfile
import threading
import time
import types
from typing import Any

import jax
import numpy as np
import psutil
import tyro

from openpi import envs
from openpi.envs import base as env_base
from openpi.latents import collect as collection
from openpi.latents import schema, store
from openpi.models.capture import CaptureSpec
from openpi.models.pi0_config import Pi0Config
from openpi.policies import policy_config

SUITE, TASK_ID = "libero_goal", 0
LIBERO = envs.get("libero")


@dataclasses.dataclass
class Args:
    # Timing rounds (each runs one capture-off and one capture-on episode).
    rounds: int = 5
    # Consecutive capture-on episodes for the RSS figure.
    rss_episodes: int = 5
    # Env steps per episode (after the wait steps); an inference every 5 steps.
    max_steps: int = 50
    # Cap glibc's malloc arenas first, as `collection.collect` does (--no-cap-malloc-arenas shows the RSS growth
    # without it).
    cap_malloc_arenas: bool = True
    # Where the stores go (default: a temporary directory, deleted at the end).
    work_dir: pathlib.Path | None = None
    out: pathlib.Path = pathlib.Path("benchmarks/results/collection_overhead.json")


class PeakRss:
    """Samples this process's RSS every `interval` seconds on a thread; `peak()` since the last `reset()`."""

    def __init__(self, interval: float = 0.02):
        self._process = psutil.Process()
        self._interval = interval
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._process.memory_info().rss
            with self._lock:
                self._peak = max(self._peak, rss)
            time.sleep(self._interval)

    def reset(self) -> None:
        with self._lock:
            self._peak = self._process.memory_info().rss

    def peak(self) -> int:
        with self._lock:
            return max(self._peak, self._process.memory_info().rss)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "mujoco_gl": os.environ.get("MUJOCO_GL"),
    }


def _cpu_s() -> float:
    """CPU seconds of this process, all threads (the sim, its software rendering, JAX and the store writer)."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


def _dir_bytes(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _episode_noise(k: int, shape: tuple[int, int]):
    """The collection's per-episode noise (default_rng([seed, task_id, episode])), for the capture-off variant."""
    rng = np.random.default_rng([LIBERO.default_seed, TASK_ID, k])
    while True:
        yield rng.standard_normal(shape, dtype=np.float32)


class Runner:
    def __init__(self, args: Args, work_dir: pathlib.Path):
        self.args = args
        self.work_dir = work_dir
        self.policy = policy_config.create_trained_policy(
            "pi0_libero_tiny", sample_kwargs={"num_steps": 10}, rng_seed=LIBERO.default_seed
        )
        self.config = self.policy.model.config
        self.env = LIBERO.make_env(LIBERO.get_task(SUITE, TASK_ID), LIBERO.default_seed)
        task = self.env.task
        self.task_dict = {
            "task_id": task.task_id,
            "task_name": task.name,
            "suite": task.suite,
            "language": task.language,
        }
        self.writers: dict[str, store.LatentStoreWriter] = {}
        self.rss = PeakRss()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.env.close()
        self.rss.close()

    def _collection_args(self, name: str, spec: CaptureSpec) -> collection.CollectionArgs:
        return collection.CollectionArgs(
            preset="pi0_libero_tiny",
            task_suite=SUITE,
            task_ids=(TASK_ID,),
            max_steps=self.args.max_steps,
            capture=spec,
            output_dir=self.work_dir / name,
        )

    def _writer(self, name: str, args: collection.CollectionArgs) -> store.LatentStoreWriter:
        if name not in self.writers:
            manifest = {"arguments": dataclasses.asdict(args), "capture_spec": args.capture.to_dict(), "bench": name}
            self.writers[name] = store.LatentStoreWriter.create_or_open(args.output_dir, manifest, resume=False)
        return self.writers[name]

    def warm_up(self) -> None:
        """Compiles every program the timed episodes use (plain infer, default capture, everything)."""
        element = self.env.policy_input(self.env.reset(0), self.env.prompt)
        noise = next(_episode_noise(0, (self.config.action_horizon, self.config.action_dim)))
        self.policy.infer(element, noise=noise)
        for spec in (CaptureSpec(), CaptureSpec.everything()):
            self.policy.infer_with_latents(element, noise=noise, capture=spec)

    def episode_off(self, k: int) -> dict[str, Any]:
        noise = _episode_noise(k, (self.config.action_horizon, self.config.action_dim))
        infer_s: list[float] = []

        def policy_fn(element):
            start = time.perf_counter()
            actions = self.policy.infer(element, noise=next(noise))["actions"]
            infer_s.append(time.perf_counter() - start)
            return actions

        self.rss.reset()
        start, cpu = time.perf_counter(), _cpu_s()
        result = env_base.run_episode(self.env, k, policy_fn, max_steps=self.args.max_steps)
        wall, cpu = time.perf_counter() - start, _cpu_s() - cpu
        return self._row("off", k, wall, cpu, result, infer_s)

    def episode_on(self, k: int, name: str = "default", spec: CaptureSpec | None = None) -> dict[str, Any]:
        args = self._collection_args(name, CaptureSpec() if spec is None else spec)
        plan = collection.make_plan(args)
        writer = self._writer(name, args)
        infer_s: list[float] = []

        def infer_with_latents(element, **kwargs):
            start = time.perf_counter()
            out = self.policy.infer_with_latents(element, **kwargs)
            infer_s.append(time.perf_counter() - start)
            return out

        timed_policy = types.SimpleNamespace(model=self.policy.model, infer_with_latents=infer_with_latents)
        self.rss.reset()
        start, cpu = time.perf_counter(), _cpu_s()
        episode = writer.begin_episode(self.task_dict, k, {"init_state_index": k, "seed": LIBERO.default_seed})
        result = collection.run_task_episode(plan, timed_policy, self.env, episode, k)
        episode.finish({"success": result.success, "total_steps": result.total_steps, "error": result.error})
        writer.flush()
        wall, cpu = time.perf_counter() - start, _cpu_s() - cpu
        return self._row(name, k, wall, cpu, result, infer_s)

    def _row(
        self, variant: str, k: int, wall: float, cpu: float, result: env_base.EpisodeResult, infer_s: list[float]
    ) -> dict:
        return {
            "variant": variant,
            "episode": k,
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "total_steps": result.total_steps,
            "num_inferences": result.num_inferences,
            "success": result.success,
            "error": result.error,
            "median_inference_ms": round(1000 * statistics.median(infer_s), 1) if infer_s else None,
            "peak_rss_bytes": self.rss.peak(),
        }

    def store_bytes(self, name: str) -> dict[str, Any]:
        """Raw bytes per inference (latents / whole record) from the stored fields, and on-disk bytes per inference."""
        self.writers[name].flush()
        root = self.work_dir / name
        reader = store.open_store(root)
        inferences = 0
        raw_latents = raw_record = 0
        for task_id in reader.task_ids():
            for k in reader.episode_indices(task_id):
                episode = reader.episode(task_id, k)
                inferences += episode.committed
                for key, spec in episode.fields.items():
                    nbytes = spec.step_nbytes * episode.committed
                    raw_record += nbytes
                    if key in collection_latent_keys():
                        raw_latents += nbytes
        return {
            "inferences": inferences,
            "raw_latents_per_inference": raw_latents // inferences,
            "raw_record_per_inference": raw_record // inferences,
            "disk_per_inference": _dir_bytes(root) // inferences,
            "disk_total": _dir_bytes(root),
        }


def collection_latent_keys() -> frozenset[str]:
    return frozenset(
        {
            "expert_0_hidden_states", "expert_0_segment_means", "text_only_hidden_states", "text_mask",
            "tokenized_prompt", "expert_1_hidden_states", "expert_1_segment_means", "attention_to_text",
            "denoise_times", "x_t", "v_t",
        }
    )  # fmt: skip


def full_size_raw_bytes() -> dict[str, int]:
    """Raw latent bytes per inference of full-size pi0 (shapes only: jax.eval_shape, no weights)."""
    model = jax.eval_shape(lambda: Pi0Config().create(jax.random.key(0)))
    holder = types.SimpleNamespace(model=model)
    out = {}
    for name, spec in (("default", CaptureSpec()), ("everything", CaptureSpec.everything())):
        shapes = collection.latent_shapes(holder, spec, 10)
        shapes.pop("actions", None)
        out[name] = schema.estimate_bytes(shapes)
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def run(args: Args) -> dict[str, Any]:
    # What `collect` does first, before any JAX / env thread exists.
    arenas_capped = collection.limit_malloc_arenas() if args.cap_malloc_arenas else False
    LIBERO.configure()
    machine = _machine()
    with contextlib.ExitStack() as stack:
        if args.work_dir is None:
            work_dir = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="collection_bench_")))
        else:
            work_dir = args.work_dir
            work_dir.mkdir(parents=True, exist_ok=True)
        runner = Runner(args, work_dir)
        stack.callback(runner.close)
        t0 = time.perf_counter()
        runner.warm_up()
        print(f"setup + compile: {time.perf_counter() - t0:.1f} s (excluded)", flush=True)

        # 2. Consecutive capture-on episodes: peak RSS per episode.
        rss_rows = [runner.episode_on(k, name="rss") for k in range(args.rss_episodes)]
        for row in rss_rows:
            print(f"  rss episode {row['episode']}: {row['wall_s']:.1f} s, peak RSS {_mib(row['peak_rss_bytes'])}")

        # 1. Interleaved rounds: the same initial state (and noise) for both variants of a round.
        rows = []
        for r in range(args.rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for variant in order:
                row = runner.episode_off(r) if variant == "off" else runner.episode_on(r)
                rows.append(row)
                print(
                    f"  round {r} {row['variant']:8s}: {row['wall_s']:.1f} s ({row['total_steps']} steps)", flush=True
                )

        # 3. Everything on: one episode.
        everything_row = runner.episode_on(0, name="everything", spec=CaptureSpec.everything())
        print(f"  everything: {everything_row['wall_s']:.1f} s", flush=True)
        bytes_default = runner.store_bytes("default")
        bytes_everything = runner.store_bytes("everything")

    off = [r["wall_s"] for r in rows if r["variant"] == "off"]
    on = [r["wall_s"] for r in rows if r["variant"] == "default"]
    ratios = [b / a for a, b in zip(off, on, strict=True)]
    cpu_off = [r["cpu_s"] for r in rows if r["variant"] == "off"]
    cpu_on = [r["cpu_s"] for r in rows if r["variant"] == "default"]
    peaks = [r["peak_rss_bytes"] for r in rss_rows]
    growth = (max(peaks[1:]) - peaks[0]) / peaks[0] if len(peaks) > 1 else 0.0
    report = {
        "benchmark": "collection_overhead",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "setup": {
            "preset": "pi0_libero_tiny",
            "suite": SUITE,
            "task_id": TASK_ID,
            "max_steps": args.max_steps,
            "replan_steps": 5,
            "num_denoise_steps": 10,
            "rounds": args.rounds,
            "rss_episodes": args.rss_episodes,
            "malloc_arenas_capped": arenas_capped,
        },
        "wall_time": {
            "off_s": off,
            "on_s": on,
            "off_median_s": statistics.median(off),
            "on_median_s": statistics.median(on),
            "ratio_per_round": [round(x, 4) for x in ratios],
            "ratio_median": round(statistics.median(ratios), 4),
            "ratio_of_medians": round(statistics.median(on) / statistics.median(off), 4),
            "target_ratio": 1.10,
            "cpu_off_median_s": statistics.median(cpu_off),
            "cpu_on_median_s": statistics.median(cpu_on),
            "cpu_ratio_of_medians": round(statistics.median(cpu_on) / statistics.median(cpu_off), 4),
            "median_inference_ms_off": statistics.median(
                r["median_inference_ms"] for r in rows if r["variant"] == "off"
            ),
            "median_inference_ms_on": statistics.median(
                r["median_inference_ms"] for r in rows if r["variant"] == "default"
            ),
            "everything_episode_s": everything_row["wall_s"],
        },
        "peak_rss": {
            "per_episode_bytes": peaks,
            "growth_after_first": round(growth, 4),
            "target_growth": 0.05,
        },
        "bytes_per_inference": {
            "tiny_default": bytes_default,
            "tiny_everything": bytes_everything,
            "full_size_raw_latents": full_size_raw_bytes(),
        },
        "episodes": rows + rss_rows + [everything_row],
    }
    return report


def print_table(report: dict[str, Any]) -> None:
    m, w, rss, b = report["machine"], report["wall_time"], report["peak_rss"], report["bytes_per_inference"]
    s = report["setup"]
    print()
    print(f"Machine: {m['cpu']}, {m['cpu_count']} cores, {m['memory_gib']} GiB, {m['jax_devices']}, "
          f"load avg at start {m['load_average_at_start']}")  # fmt: skip
    print(f"Tiny preset, {s['suite']} task {s['task_id']}, {s['max_steps']} steps per episode ({s['rounds']} rounds)")
    print(f"{'':34s}{'off':>10s}{'on':>10s}{'ratio':>8s}")
    print(
        f"{'wall time per episode (median)':34s}{w['off_median_s']:>9.2f}s{w['on_median_s']:>9.2f}s"
        f"{w['ratio_median']:>8.3f}   (median of per-round ratios; target <= {w['target_ratio']})"
    )
    print(f"{'':34s}per round: {w['ratio_per_round']}, ratio of medians {w['ratio_of_medians']}")
    print(
        f"{'CPU time per episode (median)':34s}{w['cpu_off_median_s']:>9.2f}s{w['cpu_on_median_s']:>9.2f}s"
        f"{w['cpu_ratio_of_medians']:>8.3f}   (all threads of the process)"
    )
    ms_off, ms_on = w["median_inference_ms_off"], w["median_inference_ms_on"]
    print(f"{'policy call per inference (median)':34s}{ms_off:>8.1f}ms{ms_on:>8.1f}ms")
    peaks = ", ".join(_mib(p) for p in rss["per_episode_bytes"])
    print(f"peak RSS per episode ({len(rss['per_episode_bytes'])} consecutive, capture on): {peaks}; "
          f"growth after the first {rss['growth_after_first']:+.1%} (target <= 5%)")  # fmt: skip
    print(f"{'bytes per inference':34s}{'raw latents':>14s}{'raw record':>14s}{'on disk':>14s}")
    for name in ("tiny_default", "tiny_everything"):
        x = b[name]
        raw_latents, raw_record, disk = (x[f] / 1024 for f in ("raw_latents_per_inference", "raw_record_per_inference",
                                                                "disk_per_inference"))  # fmt: skip
        print(
            f"{name:34s}{raw_latents:>11.1f} KiB{raw_record:>11.1f} KiB{disk:>11.1f} KiB   "
            f"({x['inferences']} inferences)"
        )
    full = b["full_size_raw_latents"]
    print(f"full-size pi0 raw latents per inference: default {_mib(full['default'])}, "
          f"everything {_mib(full['everything'])}")  # fmt: skip


def main(args: Args) -> None:
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"\nWrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
