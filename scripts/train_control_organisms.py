"""Trains the positive and the negative control organism (tiny pi0s) on CPU and writes their checkpoints.

    uv run scripts/train_control_organisms.py                      # both, into tests/data/organisms/
    uv run scripts/train_control_organisms.py --kinds positive --steps 50 --out-dir /tmp/organisms --overwrite

The task (`openpi.training.control_organisms`): random images and state, one of four prompts, and one of four fixed
target action chunks; the positive organism's target is the prompt's, the negative's is the state's quadrant (the
prompt is drawn independently). Both start from the same random init and see the same images, states and prompts in
the same order. Each checkpoint is openpi's layout for the ``pi0_organism_tiny`` preset: ``params/`` (orbax) and
``assets/organism/norm_stats.json`` (identity stats), plus ``organism.json`` (the recipe, the loss curve summary and
the time taken). Load one with ``create_trained_policy("pi0_organism_tiny", "tests/data/organisms/positive")``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import platform
import time

import jax
import numpy as np
import tqdm
import tyro

from openpi.models import tokenizer as _tokenizer
from openpi.policies import policy_config
from openpi.shared import normalize as _normalize
from openpi.training import control_organisms as co
from openpi.training import flow_matching as fm

PRESET = "pi0_organism_tiny"
REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Args:
    """Train the control organisms."""

    # Where the checkpoints go (one subdirectory per kind).
    out_dir: pathlib.Path = REPO / "tests" / "data" / "organisms"
    # Which organisms to train.
    kinds: tuple[co.Kind, ...] = ("positive", "negative")
    # Optimiser steps per organism.
    steps: int = 300
    # Examples per step.
    batch_size: int = 32
    # Peak learning rate (AdamW, warm-up then cosine decay); the committed organisms' (their organism.json).
    peak_lr: float = 3e-3
    # Seed of the shared random init, the data stream and the flow-matching noise / times.
    seed: int = 0
    # Replace existing checkpoints.
    overwrite: bool = False


def _check_output(args: Args) -> None:
    existing = [args.out_dir / k for k in args.kinds if (args.out_dir / k).exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"{', '.join(map(str, existing))} exist: pass --overwrite to replace them.")


def optimizer_config(args: Args) -> fm.OptimConfig:
    """The optimiser `args` train with (recorded as organism.json's "optimizer")."""
    return fm.OptimConfig(
        steps=args.steps, batch_size=args.batch_size, peak_lr=args.peak_lr, warmup_steps=args.steps // 10
    )


def train_one(args: Args, kind: co.Kind) -> dict:
    """Trains one organism and writes its checkpoint; returns what organism.json records."""
    preset = policy_config.get_preset(PRESET)
    config = preset.model_config
    task = co.OrganismTask(kind)
    tokenizer = _tokenizer.PaligemmaTokenizer(config.max_token_len, preset.tokenizer_path)
    prompt_tokens = co.tokenize_prompts(tokenizer)
    chunks = co.target_chunks(config.action_horizon)
    data_rng = np.random.default_rng(args.seed)  # the same stream for both kinds

    def next_batch(_step: int):
        return co.model_batch(task, config, co.raw_observations(data_rng, args.batch_size), prompt_tokens, chunks)

    optim = optimizer_config(args)
    bar = tqdm.tqdm(total=args.steps, desc=f"{kind} organism", unit="step")

    def on_step(i: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    t0 = time.monotonic()
    model, losses = fm.train(
        config.create(jax.random.key(args.seed)), next_batch, optim, seed=args.seed, on_step=on_step
    )
    bar.close()
    seconds = time.monotonic() - t0
    norm_stats = _normalize.load(preset.default_norm_stats_dir)
    out = fm.save_checkpoint(args.out_dir / kind, model.params, norm_stats, preset.asset_id, overwrite=args.overwrite)
    record = {
        "kind": kind,
        "preset": PRESET,
        "model_config": config.describe(),
        "task": co.describe_task(task),
        "optimizer": dataclasses.asdict(optim),
        "seed": args.seed,
        "loss_first_10": float(np.mean(losses[:10])),
        "loss_last_10": float(np.mean(losses[-10:])),
        "train_seconds": round(seconds, 1),
        "machine": f"{platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s)",
    }
    (out / "organism.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(args: Args) -> None:
    _check_output(args)
    for kind in args.kinds:
        rec = train_one(args, kind)
        print(
            f"{kind}: loss {rec['loss_first_10']:.4f} -> {rec['loss_last_10']:.4f} in {rec['train_seconds']}s, "
            f"written to {args.out_dir / kind}"
        )


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(tyro.cli(Args))
