"""What a run will capture and how much it will write: shapes from `jax.eval_shape`, no computation."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from openpi.latents import schema
from openpi.latents.collect.args import Plan
from openpi.models import model as _model
from openpi.models.capture import CaptureSpec
from openpi.policies.policy import Policy


def latent_shapes(policy: Policy, capture: CaptureSpec, num_steps: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of what `infer_with_latents` returns for one observation (no computation)."""
    config = policy.model.config
    h, w = _model.IMAGE_RESOLUTION
    obs = _model.Observation(
        images={k: jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32) for k in _model.IMAGE_KEYS},
        image_masks={k: jax.ShapeDtypeStruct((1,), jnp.bool_) for k in _model.IMAGE_KEYS},
        state=jax.ShapeDtypeStruct((1, config.action_dim), jnp.float32),
        tokenized_prompt=jax.ShapeDtypeStruct((1, config.max_token_len), jnp.int32),
        tokenized_prompt_mask=jax.ShapeDtypeStruct((1, config.max_token_len), jnp.bool_),
    )
    out = jax.eval_shape(
        lambda m, o: m.infer_with_latents(jax.random.key(0), o, num_steps=num_steps, capture=capture),
        policy.model,
        obs,
    )
    return {k: v for k, v in out.items() if v is not None}


def _rollout_bytes(plan: Plan, policy: Policy) -> int:
    """Bytes per inference besides the latents: executed actions, model actions and noise, images."""
    config = policy.model.config
    nbytes = config.action_horizon * (plan.simulator.action_dim + 2 * config.action_dim) * 4
    if plan.args.store_images:
        nbytes += len(plan.simulator.camera_keys) * math.prod(plan.simulator.image_shape)
    return nbytes


@dataclasses.dataclass(frozen=True)
class SizeEstimate:
    """Uncompressed upper bounds (every episode runs its `max_steps`) of what a run writes, in bytes."""

    shapes: dict[str, jax.ShapeDtypeStruct]  # the latents of one inference
    per_inference: int
    inferences_per_episode: int
    num_episodes: int

    @property
    def per_episode(self) -> int:
        return self.per_inference * self.inferences_per_episode

    @property
    def total(self) -> int:
        return self.per_episode * self.num_episodes

    def describe(self) -> str:
        lines = ["Capture per inference:"]
        for key, s in sorted(self.shapes.items()):
            nbytes = schema.nbytes(s.shape, s.dtype)
            lines.append(f"  {key:26s} {list(s.shape)!s:28s} {np.dtype(s.dtype).name:9s} {schema.format_bytes(nbytes)}")
        lines.append(
            f"Estimated size (uncompressed, at most): {schema.format_bytes(self.per_inference)} per inference, "
            f"{schema.format_bytes(self.per_episode)} per episode (<= {self.inferences_per_episode} inferences), "
            f"{schema.format_bytes(self.total)} for {self.num_episodes} episodes."
        )
        return "\n".join(lines)


def estimate_size(plan: Plan, policy: Policy) -> SizeEstimate:
    """What one inference captures and the bytes per inference / episode / run."""
    args = plan.args
    shapes = latent_shapes(policy, args.capture, args.num_denoise_steps)
    shapes.pop("actions", None)
    latents = schema.estimate_bytes(shapes)
    per_inference = latents + _rollout_bytes(plan, policy)
    if args.counterfactual != "none":  # a rerun's latents, and its teacher-forced twin's (cf_tf_*)
        reruns = 2 if args.counterfactual_teacher_forced else 1
        per_inference += reruns * latents // args.counterfactual_every
    return SizeEstimate(shapes, per_inference, plan.inferences_per_episode, len(plan.tasks) * len(plan.episodes))


def describe_capture(plan: Plan, policy: Policy) -> str:
    """What will be captured, and the estimated bytes per inference / episode / run (uncompressed)."""
    return estimate_size(plan, policy).describe()
