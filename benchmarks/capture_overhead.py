"""Capture overhead of `Pi0.infer_with_latents` relative to the plain `Pi0.sample_actions`.

For each model config, times (median over interleaved repeats, after compilation) of:
  * sample_actions                        — the plain model
  * infer_with_latents, default spec      — text window + pooled streams + attention to text + trajectory
  * infer_with_latents, everything        — every stream at full token resolution, every layer and step
and reports each as a ratio to sample_actions. Target: the default spec stays within 1.10.

pi0.5 configs (`pi05_*`, `Pi0Config(pi05=True)`) also time "everything + modulation" (the adaRMS scale/shift/gate of
every layer and denoising step).

    uv run python benchmarks/capture_overhead.py                 # dummy + mid configs, pi0 and pi0.5
    uv run python benchmarks/capture_overhead.py --configs full  # full-size pi0 (needs ~14 GB RAM in bf16)
    uv run python benchmarks/capture_overhead.py --configs pi05_full
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
import statistics
import time

import jax
import numpy as np
import tyro

from openpi.models import gemma
from openpi.models import model as _model
from openpi.models.capture import CaptureSpec
from openpi.models.pi0_config import Pi0Config

CONFIGS = {
    "dummy": Pi0Config(
        paligemma_variant="dummy", action_expert_variant="dummy", siglip_variant="mu/14", vocab_size=1024
    ),
    # A mid-size model: 6 layers, widths 512/256, SigLIP S/14 (12 layers, width 384).
    "mid": Pi0Config(
        paligemma_variant=gemma.Config(width=512, depth=6, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=64),
        action_expert_variant=gemma.Config(width=256, depth=6, mlp_dim=1024, num_heads=8, num_kv_heads=1, head_dim=64),
        siglip_variant="S/14",
        vocab_size=16_384,
    ),
    "full": Pi0Config(),
}
# pi0.5 at the same sizes, with pi05_libero's action horizon (10) and the pi0.5 text window (200).
CONFIGS.update(
    {f"pi05_{k}": dataclasses.replace(v, pi05=True, action_horizon=10, max_token_len=200) for k, v in CONFIGS.items()}
)
SPECS = {
    "default (text window + pooled)": CaptureSpec(),
    "everything": CaptureSpec.everything(),
}
PI05_SPECS = {"everything + modulation": dataclasses.replace(CaptureSpec.everything(), modulation=True)}


@dataclasses.dataclass
class Args:
    configs: tuple[str, ...] = ("dummy", "mid", "pi05_dummy", "pi05_mid")
    repeats: int = 7
    num_steps: int = 10
    out: pathlib.Path = pathlib.Path("benchmarks/results/capture_overhead.json")


def _observation(config: Pi0Config) -> _model.Observation:
    rng = np.random.default_rng(0)
    n = config.max_token_len
    mask = np.zeros((1, n), bool)
    mask[:, :12] = True
    return _model.Observation(
        images={k: rng.uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32) for k in _model.IMAGE_KEYS},
        image_masks={k: np.array([i < 2]) for i, k in enumerate(_model.IMAGE_KEYS)},
        state=rng.normal(size=(1, config.action_dim)).astype(np.float32),
        tokenized_prompt=np.where(mask, rng.integers(1, config.vocab_size, (1, n)), 0).astype(np.int32),
        tokenized_prompt_mask=mask,
    )


def _bench_config(name: str, config: Pi0Config, args: Args) -> dict:
    # Random weights created directly in the compute dtype (as a bf16 checkpoint is loaded), without a float32 copy.
    params = jax.jit(lambda rng: jax.tree.map(lambda x: x.astype(config.dtype), config.init_params(rng)))(
        jax.random.key(0)
    )
    model = config.load(params)
    obs = _observation(config)
    rng = jax.random.key(1)

    calls = {"sample_actions": lambda: model.sample_actions(rng, obs, num_steps=args.num_steps)}
    for label, spec in {**SPECS, **(PI05_SPECS if config.pi05 else {})}.items():
        calls[label] = lambda spec=spec: model.infer_with_latents(rng, obs, num_steps=args.num_steps, capture=spec)

    for fn in calls.values():  # compile
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(args.repeats):  # interleave so that load changes hit every variant alike
        for label, fn in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[label].append(time.perf_counter() - start)
    base = statistics.median(times["sample_actions"])
    rows = {
        label: {"median_s": statistics.median(t), "ratio": statistics.median(t) / base, "all_s": t}
        for label, t in times.items()
    }
    return {"config": name, "describe": config.describe(), "dtype": config.dtype, "results": rows}


def main(args: Args) -> None:
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": __import__("os").cpu_count(),
    }
    report = {"machine": machine, "num_steps": args.num_steps, "repeats": args.repeats, "configs": []}
    for name in args.configs:
        if name not in CONFIGS:
            raise SystemExit(f"Unknown config {name!r}; choose from {sorted(CONFIGS)}.")
        print(f"== {name}: {CONFIGS[name].describe()}", flush=True)
        result = _bench_config(name, CONFIGS[name], args)
        report["configs"].append(result)
        for label, row in result["results"].items():
            print(f"  {label:34s} median {row['median_s'] * 1e3:9.1f} ms   ratio {row['ratio']:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
