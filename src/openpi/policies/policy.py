"""`Policy`: raw observation -> transforms -> jitted pi0 -> output transforms -> actions (and latents).

Mirrors upstream openpi's `Policy.infer` (one unbatched observation in, one action chunk out) and adds
`infer_with_latents`, which also returns the hidden states asked for by a `CaptureSpec`, the noise used and the
model-space actions, so that a run can be recorded and rerun counterfactually with the same noise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from openpi import transforms as _transforms
from openpi.models import model as _model
from openpi.models.capture import CaptureSpec


def _batch(tree: Any) -> Any:
    """Adds a leading batch axis to every numeric leaf (as jax arrays); drops string leaves (nothing consumes them)."""
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            batched = _batch(v)
            if batched is not None:
                out[k] = batched
        return out
    arr = np.asarray(tree)
    if arr.dtype.kind in "USO":
        return None
    return jnp.asarray(arr)[np.newaxis, ...]


def _model_dims(model: Any) -> tuple[int, int]:
    layout = getattr(model, "layout", None)  # a `family.Model` states its sizes in its token layout
    if layout is not None:
        return int(layout.action_horizon), int(layout.action_dim)
    config = getattr(model, "config", model)
    try:
        return int(config.action_horizon), int(config.action_dim)
    except AttributeError as e:
        raise TypeError(
            "Policy needs a model with config.action_horizon and config.action_dim (a Pi0); "
            f"got {type(model).__name__}."
        ) from e


class Policy:
    """Runs a pi0 model on single (unbatched) observations.

    Args:
        model: a `Pi0` (a JAX pytree with `sample_actions` and `infer_with_latents`).
        transforms: input transforms (raw observation -> model input dict), applied in order.
        output_transforms: output transforms applied to ``{"state": model-input state, "actions": [H, AD]}``.
        rng: the key that sampling rngs (and, in `infer_with_latents`, the noise) are split from; default key(0).
        sample_kwargs: extra static keyword arguments of the model's sampling (e.g. ``{"num_steps": 10}``).
        metadata: free-form information about the policy (preset, checkpoint, ...).
    """

    def __init__(
        self,
        model: Any,
        *,
        transforms: Sequence[_transforms.DataTransformFn] = (),
        output_transforms: Sequence[_transforms.DataTransformFn] = (),
        rng: jax.Array | None = None,
        sample_kwargs: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self._model = model
        self._input_transform = _transforms.compose(transforms)
        self._output_transform = _transforms.compose(output_transforms)
        self._rng = jax.random.key(0) if rng is None else rng
        self._sample_kwargs = dict(sample_kwargs or {})
        if {"noise", "capture", "intervention"} & set(self._sample_kwargs):
            raise ValueError(
                "sample_kwargs must not contain 'noise', 'capture' or 'intervention': pass them to infer / "
                "infer_with_latents."
            )
        self._metadata = dict(metadata or {})
        self._action_horizon, self._action_dim = _model_dims(model)

    @property
    def model(self) -> Any:
        return self._model

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    @property
    def action_horizon(self) -> int:
        return self._action_horizon

    @property
    def action_dim(self) -> int:
        return self._action_dim

    @property
    def sample_kwargs(self) -> dict[str, Any]:
        """The static sampling options (e.g. ``{"num_steps": 10}``) every model call gets."""
        return dict(self._sample_kwargs)

    def next_rng(self) -> jax.Array:
        """A fresh key split from the policy's rng (advances it, as each `infer` call does)."""
        self._rng, key = jax.random.split(self._rng)
        return key

    def draw_noise(self) -> np.ndarray:
        """Noise for one inference drawn from the policy's rng, as `infer_with_latents` draws it ([H, AD] float32)."""
        return np.asarray(
            jax.random.normal(self.next_rng(), (self._action_horizon, self._action_dim), dtype=jnp.float32)
        )

    def check_noise(self, noise: Any) -> np.ndarray:
        """`noise` as [action_horizon, action_dim] float32 (a leading batch axis of 1 is dropped); else ValueError."""
        return np.asarray(self._batched_noise(noise)[0])

    def finish_outputs(self, state: Any, model_actions: Any, seconds: float) -> dict[str, Any]:
        """The outputs of one observation: the output transforms applied to its model-input `state` [1, AD] and
        normalized `model_actions` [1, H, AD] (batch axis of one), plus ``policy_timing``."""
        return self._finish(state, model_actions, seconds)

    # -----------------------------------------------------------------------------------------------------------------

    def prepare(self, obs: Mapping[str, Any]) -> tuple[dict[str, Any], _model.Observation]:
        """Applies the input transforms and batches: (model input dict with batch axis, Observation)."""
        inputs = self._input_transform(dict(obs))
        batched = _batch(inputs)
        return batched, _model.Observation.from_dict(batched)

    def _batched_noise(self, noise: Any) -> Float[jax.Array, "1 h ad"]:
        noise = jnp.asarray(noise, dtype=jnp.float32)
        expected = (self._action_horizon, self._action_dim)
        if noise.ndim == 3 and noise.shape[0] == 1:
            noise = noise[0]
        if noise.shape != expected:
            raise ValueError(
                f"noise must have shape [action_horizon, action_dim] = {list(expected)} (one sample), got "
                f"{list(noise.shape)}."
            )
        return noise[None]

    def _finish(self, state: jax.Array, model_actions: jax.Array, t_model: float) -> dict[str, Any]:
        state_np = np.asarray(state[0])
        actions_np = np.asarray(model_actions[0])
        outputs = self._output_transform({"state": state_np, "actions": actions_np})
        outputs = dict(outputs)
        outputs["state"] = state_np
        outputs["policy_timing"] = {"infer_ms": t_model * 1000.0}
        return outputs

    def infer(self, obs: Mapping[str, Any], *, noise: Any = None, intervention: Any = None) -> dict[str, Any]:
        """One action chunk for one observation.

        Args:
            obs: the raw (unbatched) observation, e.g. LIBERO's ``observation/...`` keys plus ``prompt``.
            noise: optional [action_horizon, action_dim] starting noise (x at t = 1).
            intervention: optional `openpi.models.intervention.Intervention` applied inside the model call (batch
                axis B = 1 in its values); checked before compiling.

        Returns:
            ``actions`` (after the output transforms; [H, 7] float64 for LIBERO), ``state`` (the model-input state:
            normalized and padded, [action_dim] float32) and ``policy_timing`` (``infer_ms``: the model call).
        """
        inputs, observation = self.prepare(obs)
        kwargs = dict(self._sample_kwargs)
        if noise is not None:
            kwargs["noise"] = self._batched_noise(noise)
        if intervention is not None:  # only passed when given: models without interventions keep working
            kwargs["intervention"] = intervention
        self._rng, sample_rng = jax.random.split(self._rng)
        start = time.monotonic()
        actions = self._model.sample_actions(sample_rng, observation, **kwargs)  # jitted by the model
        actions = jax.block_until_ready(actions)
        return self._finish(inputs["state"], actions, time.monotonic() - start)

    def infer_with_latents(
        self,
        obs: Mapping[str, Any],
        *,
        noise: Any = None,
        capture: CaptureSpec | None = None,
        intervention: Any = None,
        x_t_sequence: Any = None,
    ) -> dict[str, Any]:
        """Like `infer`, plus the captured hidden states (of the edited model when an `intervention` is given).

        ``x_t_sequence`` ([num_steps, H, AD] or [num_steps, 1, H, AD], normalized space, e.g. another run's
        ``latents["x_t"][:num_steps]``) teacher-forces the denoising trajectory: step i is fed x_t_sequence[i]
        instead of the carried x_t, so a counterfactual rerun differs from its baseline by the prompt alone.

        The noise is drawn from the policy's rng (``jax.random.normal``) when not given and returned, so a
        counterfactual rerun (e.g. another prompt) can reuse it. Requesting capture does not change the actions.

        Returns `infer`'s keys plus ``latents`` (dict of numpy arrays with the batch axis kept; keys and shapes in
        docs/INTERFACES.md), ``noise`` ([H, AD] float32, the noise used) and ``model_actions`` ([H, AD] float32,
        the model output in normalized space, before the output transforms).
        """
        capture = CaptureSpec() if capture is None else capture
        inputs, observation = self.prepare(obs)
        self._rng, sample_rng = jax.random.split(self._rng)
        if noise is None:
            sample_rng, noise_rng = jax.random.split(sample_rng)
            noise = jax.random.normal(noise_rng, (self._action_horizon, self._action_dim), dtype=jnp.float32)
        batched_noise = self._batched_noise(noise)
        kwargs = dict(self._sample_kwargs)
        if intervention is not None:
            kwargs["intervention"] = intervention
        if x_t_sequence is not None:
            xs = jnp.asarray(x_t_sequence, jnp.float32)
            kwargs["x_t_sequence"] = xs[:, None] if xs.ndim == 3 else xs  # the batch axis (B = 1)
        start = time.monotonic()
        result = self._model.infer_with_latents(  # one jitted call (the capture spec is static)
            sample_rng, observation, noise=batched_noise, capture=capture, **kwargs
        )
        result = jax.block_until_ready(result)
        elapsed = time.monotonic() - start
        model_actions = result["actions"]
        outputs = self._finish(inputs["state"], model_actions, elapsed)
        outputs["latents"] = {k: np.asarray(v) for k, v in result.items() if k != "actions"}
        outputs["noise"] = np.asarray(batched_noise[0])
        outputs["model_actions"] = np.asarray(model_actions[0])
        return outputs
