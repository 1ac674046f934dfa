"""Throughput / latency / RSS benchmark of the latent store at full pi0 size.

    uv run python -m openpi.latents.store.bench --out /tmp/store_bench --steps 40 --spec default
    uv run python -m openpi.latents.store.bench --out /tmp/store_bench --steps 40 --spec full

Hidden states are random normal values in bf16 (compress about like real ones, ~1.3x). Reads hit the page cache
(no root to drop it), so read latencies are warm-cache numbers plus decode.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import threading
import time

import ml_dtypes
import numpy as np
import psutil

from openpi.latents.schema import estimate_bytes, format_bytes
from openpi.latents.store.reader import open_store
from openpi.latents.store.writer import LatentStoreWriter

BF16 = ml_dtypes.bfloat16
L, S, TP, TT, TS, W0, W1, H = 18, 10, 816, 48, 51, 2048, 1024, 50


def record_shapes(spec: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    shapes = {
        "text_only_hidden_states": ((L, 1, TT, W0), BF16),
        "text_mask": ((1, TT), np.bool_),
        "tokenized_prompt": ((1, TT), np.int32),
        "attention_to_text": ((S, L, 1, 8, TS), np.float32),
        "denoise_times": ((S,), np.float32),
        "actions": ((H, 7), np.float32),
        "executed_actions": ((5, 7), np.float32),
        "model_actions": ((H, 32), np.float32),
        "image": ((224, 224, 3), np.uint8),
        "wrist_image": ((224, 224, 3), np.uint8),
        "state": ((8,), np.float32),
    }
    if spec == "full":
        shapes["expert_0_hidden_states"] = ((L, 1, TP, W0), BF16)
        shapes["expert_1_hidden_states"] = ((S, L, 1, TS, W1), BF16)
    else:
        shapes["expert_0_segment_means"] = ((L, 1, 4, W0), BF16)
        shapes["expert_1_segment_means"] = ((S, L, 1, 2, W1), BF16)
    return shapes


def make_record(shapes, rng: np.random.Generator) -> dict[str, np.ndarray]:
    rec = {}
    for key, (shape, dtype) in shapes.items():
        if np.dtype(dtype).kind in "fV":
            arr = (rng.standard_normal(shape, dtype=np.float32) * 2).astype(dtype)
        elif np.dtype(dtype) == np.bool_:
            arr = rng.random(shape) < 0.3
        else:
            arr = rng.integers(0, 255, shape).astype(dtype)
        arr.flags.writeable = False  # like arrays from jax: queued without a copy
        rec[key] = arr
    return rec


class RssSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/store_bench")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--spec", choices=["default", "full"], default="default")
    ap.add_argument("--queue-size", type=int, default=8)
    args = ap.parse_args()
    root = pathlib.Path(args.out) / args.spec
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    shapes = record_shapes(args.spec)
    pool = [make_record(shapes, rng) for _ in range(3)]
    step_bytes = estimate_bytes(pool[0])
    task = {"task_id": 0, "task_name": "bench", "suite": "bench", "language": "pick up the bowl"}

    sampler = RssSampler()
    rss0 = sampler.proc.memory_info().rss
    sampler.start()
    t0 = time.perf_counter()
    put_times = []
    with LatentStoreWriter.create_or_open(root, {"bench": args.spec}, resume=False, queue_size=args.queue_size) as w:
        ep = w.begin_episode(task, 0, {"seed": 7})
        for i in range(args.steps):
            ts = time.perf_counter()
            ep.append_step({"t": 5 * i, "prompt": task["language"], **pool[i % len(pool)]})
            put_times.append(time.perf_counter() - ts)
        ep.finish({"success": True, "total_steps": 5 * args.steps})
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    raw = step_bytes * args.steps
    print(f"spec={args.spec} steps={args.steps} raw/step={format_bytes(step_bytes)} raw={format_bytes(raw)}")
    print(f"write: {wall:.2f} s, {raw / wall / 1e6:.0f} MB/s raw, {wall / args.steps * 1e3:.0f} ms/step")
    print(f"producer append_step: median {np.median(put_times) * 1e3:.2f} ms, max {max(put_times) * 1e3:.0f} ms")
    print(
        f"disk {format_bytes(disk)} (ratio {raw / disk:.2f}x); RSS growth peak {(sampler.peak - rss0) / 1e6:.0f} MB "
        f"(record pool {3 * step_bytes / 1e6:.0f} MB, queue {args.queue_size})"
    )

    store = open_store(root)
    big = "expert_0_hidden_states" if args.spec == "full" else "text_only_hidden_states"
    steps = store.task_data(0)["episodes"]["episode_0"]["rollout_steps"]
    names = list(steps)
    lat = []
    for name in names[:: max(1, len(names) // 10)]:
        ts = time.perf_counter()
        x = steps[name][big]
        lat.append(time.perf_counter() - ts)
    print(f"read one step of {big} {list(x.shape)}: median {np.median(lat) * 1e3:.1f} ms")
    lat = []
    for name in names[:: max(1, len(names) // 5)]:
        ts = time.perf_counter()
        step = steps[name]
        for key in step:
            step[key]
        lat.append(time.perf_counter() - ts)
    print(f"read one whole step record ({len(step)} keys): median {np.median(lat) * 1e3:.1f} ms")
    lat = []
    for s in range(0, args.steps, max(1, args.steps // 10)):
        ts = time.perf_counter()
        store.read_array(0, 0, big, layer=9, steps=s)
        lat.append(time.perf_counter() - ts)
    print(f"read one layer of one step of {big}: median {np.median(lat) * 1e3:.1f} ms")
    ts = time.perf_counter()
    y = store.read_array(0, 0, big, layer=9)
    print(f"read layer 9 of {big} across {y.shape[0]} steps: {(time.perf_counter() - ts) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
