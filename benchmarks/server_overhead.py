"""Policy-server round trip vs in-process inference (target: ≤ 1.05× on the mid config).

For each model config (capture_overhead.py's "dummy" = the tiny preset's model, and "mid"), with LIBERO transforms,
random weights, the default CaptureSpec and 10 denoising steps, times (median over interleaved repeats, after
compilation) of one LIBERO-shaped observation (two 224×224×3 uint8 images, 8-dim state, a prompt):

  * in-process        — `Policy.infer_with_latents(obs, noise=, capture=)` (what the collection calls)
  * in-process engine — the server's inference engine called directly (`serving.engine.make_engine` with the server's
                        defaults: the batching front end, a batch of one here), no socket, no msgpack, no record:
                        "server" / "in-process engine" is what the transport adds
  * server            — `openpi_client` `WebsocketClientPolicy.infer` against `serving.PolicyServer` on loopback,
                        not recording (`--no-record`)
  * server + record   — the same with the latent store written (images, latents) as `serve_policy.py` does; the
                        writer thread is drained after each call, timed apart (``writer_drain_median_s``), so its disk
                        work never lands in the next variant's timing; ``ratio_with_drain`` counts it as if it ran on
                        the request path (an upper bound: the server replies before writing)

Client and server share this process (the server on a thread), so the client's msgpack work competes with the
server for the GIL and the cores: a pessimistic setup. Defaults of the server as shipped (`--max-batch 8`,
`--batch-wait-ms 2`: one client's request waits 2 ms for company).

    uv run python benchmarks/server_overhead.py                   # dummy + mid
    uv run python benchmarks/server_overhead.py --configs mid --repeats 15
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

import jax
import numpy as np
import tyro
from capture_overhead import CONFIGS
from openpi_client import websocket_client_policy

from openpi import serving
from openpi.models.capture import CaptureSpec
from openpi.policies import policy_config, presets
from openpi.serving.engine import make_engine

BASE_PRESET = "pi0_libero_tiny"  # LIBERO transforms, packaged norm stats and tokenizer; the model config is replaced


@dataclasses.dataclass
class Args:
    configs: tuple[str, ...] = ("dummy", "mid")
    repeats: int = 10
    num_steps: int = 10
    out: pathlib.Path = pathlib.Path("benchmarks/results/server_overhead.json")


def _observation() -> dict:
    rng = np.random.default_rng(0)
    return {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.standard_normal(8).astype(np.float32),
        "prompt": "open the middle drawer of the cabinet",
    }


def _server(policy, out: pathlib.Path, record: bool, num_steps: int):
    # The manifest names the base preset's model config (a benchmark store, deleted afterwards).
    args = serving.ServeArgs(preset=BASE_PRESET, port=0, num_denoise_steps=num_steps, output_dir=out, record=record)
    server = serving.create_server(args, policy=policy)
    port = server.start_in_thread()
    return server, websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)


def _bench_config(name: str, args: Args, tmp: pathlib.Path) -> dict:
    preset = dataclasses.replace(presets.get_preset(BASE_PRESET), name=f"bench_{name}", model_config=CONFIGS[name])
    policy = policy_config.create_trained_policy(preset, sample_kwargs={"num_steps": args.num_steps})
    obs, capture = _observation(), CaptureSpec()
    noise = np.random.default_rng(1).standard_normal((policy.action_horizon, policy.action_dim), dtype=np.float32)
    plain, plain_client = _server(policy, tmp / f"{name}_plain", False, args.num_steps)
    recording, rec_client = _server(policy, tmp / f"{name}_record", True, args.num_steps)
    defaults = serving.ServeArgs(preset=BASE_PRESET)
    engine = make_engine(policy, capture, None, max_batch=defaults.max_batch, max_wait_s=defaults.batch_wait_ms / 1e3)
    calls = {
        "in-process": lambda: policy.infer_with_latents(obs, noise=noise, capture=capture),
        "in-process engine": lambda: engine.infer(obs, noise),
        "server": lambda: plain_client.infer(obs),
        "server + record": lambda: rec_client.infer(obs),
    }
    for fn in calls.values():  # compile (once: the servers share the policy)
        fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    drain: list[float] = []
    for _ in range(args.repeats):  # interleaved, so that load changes hit every variant alike
        for label, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
            if label == "server + record":
                # The record is written on the server's writer thread after the reply; drain it here (timed
                # apart) so its disk work does not land in the next variant's timing.
                start = time.perf_counter()
                recording.recorder.writer.flush()
                drain.append(time.perf_counter() - start)
    for server in (plain, recording):
        server.stop()
        server.join(120)
    engine.close()
    base = statistics.median(times["in-process"])
    rows = {
        label: {"median_s": statistics.median(t), "ratio": statistics.median(t) / base, "all_s": t}
        for label, t in times.items()
    }
    engine_median = statistics.median(times["in-process engine"])
    for label in ("server", "server + record"):
        rows[label]["ratio_vs_engine"] = rows[label]["median_s"] / engine_median
    # Upper bound of the record's cost: as if the writer ran on the request path (it does not).
    with_drain = [t + d for t, d in zip(times["server + record"], drain, strict=True)]
    rows["server + record"].update(
        writer_drain_median_s=statistics.median(drain),
        ratio_with_drain=statistics.median(with_drain) / base,
        all_drain_s=drain,
    )
    return {"config": name, "describe": CONFIGS[name].describe(), "results": rows}


def main(args: Args) -> None:
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "jax_backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "load_average_start": os.getloadavg(),
    }
    report = {"machine": machine, "num_steps": args.num_steps, "repeats": args.repeats, "configs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            if name not in CONFIGS:
                raise SystemExit(f"Unknown config {name!r}; choose from {sorted(CONFIGS)}.")
            print(f"== {name}: {CONFIGS[name].describe()}", flush=True)
            result = _bench_config(name, args, pathlib.Path(tmp))
            report["configs"].append(result)
            for label, row in result["results"].items():
                vs_engine = f"   vs engine {row['ratio_vs_engine']:.3f}" if "ratio_vs_engine" in row else ""
                if "ratio_with_drain" in row:
                    vs_engine += f"   with the writer drained {row['ratio_with_drain']:.3f}"
                print(
                    f"  {label:17s} median {row['median_s'] * 1e3:9.1f} ms   ratio {row['ratio']:.3f}{vs_engine}",
                    flush=True,
                )
    machine["load_average_end"] = os.getloadavg()
    print(f"load average: start {machine['load_average_start']}, end {machine['load_average_end']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
