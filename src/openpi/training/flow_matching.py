"""A small optax training loop for pi0's flow-matching loss (`Pi0.compute_loss`), and openpi's checkpoint layout.

Enough to train the tiny control organisms on CPU; not a replacement for openpi's distributed trainer (no sharding,
no EMA, no data loader: batches come from a Python callable). `save_checkpoint` writes what
`openpi.policies.policy_config.create_trained_policy` restores: ``<dir>/params`` (orbax, ``{"params": params}``) and
``<dir>/assets/<asset_id>/norm_stats.json``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from openpi.models import model as _model
from openpi.models.pi0 import Pi0
from openpi.shared import normalize as _normalize

Batch = tuple[_model.Observation, np.ndarray]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay, global-norm gradient clipping."""

    steps: int = 300
    batch_size: int = 16
    peak_lr: float = 2e-3
    warmup_steps: int = 30
    end_lr_fraction: float = 0.05
    weight_decay: float = 1e-4
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}.")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps} with steps={self.steps}.")

    def optimizer(self) -> optax.GradientTransformation:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, self.peak_lr, self.warmup_steps, self.steps, self.peak_lr * self.end_lr_fraction
        )
        return optax.chain(
            optax.clip_by_global_norm(self.clip_norm), optax.adamw(schedule, weight_decay=self.weight_decay)
        )


def make_train_step(model: Pi0, optimizer: optax.GradientTransformation) -> Callable:
    """A jitted ``(params, opt_state, rng, obs, actions) -> (params, opt_state, loss)`` for `model`'s config."""
    config = model.config

    def loss_fn(params, rng, obs, actions):
        return jnp.mean(Pi0(params=params, config=config).compute_loss(rng, obs, actions))

    @jax.jit
    def step(params, opt_state, rng, obs, actions):
        loss, grads = jax.value_and_grad(loss_fn)(params, rng, obs, actions)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def train(
    model: Pi0,
    next_batch: Callable[[int], Batch],
    optim: OptimConfig,
    *,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Pi0, np.ndarray]:
    """Trains every parameter of `model` on ``next_batch(step)``; returns the trained model and the loss per step.

    The loss is `Pi0.compute_loss` (flow matching, noise and time drawn from the step's rng) averaged over the batch
    and the chunk. Deterministic for a fixed `seed` and `next_batch` on one machine.
    """
    optimizer = optim.optimizer()
    step_fn = make_train_step(model, optimizer)
    params = model.params
    opt_state = optimizer.init(params)
    rng = jax.random.key(seed)
    losses = np.zeros(optim.steps)
    for i in range(optim.steps):
        obs, actions = next_batch(i)
        params, opt_state, loss = step_fn(params, opt_state, jax.random.fold_in(rng, i), obs, actions)
        losses[i] = float(loss)
        if on_step is not None:
            on_step(i, losses[i])
    return Pi0(params=params, config=model.config), losses


def save_checkpoint(
    directory: str | pathlib.Path,
    params: Mapping[str, Any],
    norm_stats: Mapping[str, _normalize.NormStats],
    asset_id: str,
    *,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes ``<directory>/params`` (orbax, float32) and ``<directory>/assets/<asset_id>/norm_stats.json``."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).expanduser().resolve()
    if directory.exists():
        if not overwrite:
            raise FileExistsError(f"{directory} exists; pass overwrite=True (--overwrite) to replace it.")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    host = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(params))
    ocp.PyTreeCheckpointer().save(directory / "params", ocp.args.PyTreeSave({"params": host}))
    _normalize.save(directory / "assets" / asset_id, dict(norm_stats))
    return directory
