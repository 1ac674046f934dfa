"""Builders for model inputs in tests (fixture observation, random observations for any config)."""

import dataclasses

import numpy as np

from openpi.models import model as _model
from openpi.models.pi0_config import Pi0Config


def fixture_observation(inputs: dict[str, np.ndarray], prefix: str = "") -> _model.Observation:
    """The fixture's model inputs; `prefix="ds_"` takes pi05_tiny_a's discrete-state prompt and state."""
    keys = _model.IMAGE_KEYS
    return _model.Observation(
        images={k: inputs[f"image_{k}"] for k in keys},
        image_masks={k: inputs[f"image_mask_{k}"] for k in keys},
        state=inputs[f"{prefix}state"],
        tokenized_prompt=inputs[f"{prefix}tokenized_prompt"],
        tokenized_prompt_mask=inputs[f"{prefix}tokenized_prompt_mask"],
    )


def raw_libero_observation(inputs: dict[str, np.ndarray], b: int = 0) -> dict:
    """Sample `b` of a fixture's raw LIBERO-style inputs, as the LIBERO client sends it."""
    return {
        "observation/image": inputs["raw_observation_image"][b],
        "observation/wrist_image": inputs["raw_observation_wrist_image"][b],
        "observation/state": inputs["raw_observation_state"][b],
        "prompt": str(inputs["prompt"][b]),
    }


def max_abs_diff(a, b, where=None) -> float:
    """max |a - b| in float64, over the positions `where` (a boolean index) if given."""
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(diff[where].max() if where is not None else diff.max())


def abstract_observation(config: Pi0Config, batch: int = 1) -> _model.Observation:
    """Zero inputs of the right shapes (for `jax.eval_shape`)."""
    import jax.numpy as jnp

    return _model.Observation(
        images={k: jnp.zeros((batch, 224, 224, 3)) for k in _model.IMAGE_KEYS},
        image_masks={k: jnp.ones((batch,), bool) for k in _model.IMAGE_KEYS},
        state=jnp.zeros((batch, config.action_dim)),
        tokenized_prompt=jnp.zeros((batch, config.max_token_len), jnp.int32),
        tokenized_prompt_mask=jnp.ones((batch, config.max_token_len), bool),
    )


def random_observation(config: Pi0Config, batch: int, seed: int = 0) -> _model.Observation:
    """Random images in [-1, 1], third camera masked (as LiberoInputs does), prompts of different lengths."""
    rng = np.random.default_rng(seed)
    h, w = _model.IMAGE_RESOLUTION
    images = {k: rng.uniform(-1, 1, (batch, h, w, 3)).astype(np.float32) for k in _model.IMAGE_KEYS}
    masks = {k: np.full((batch,), i < 2) for i, k in enumerate(_model.IMAGE_KEYS)}
    n = config.max_token_len
    lengths = [max(2, n // (b + 2)) for b in range(batch)]
    tokens = np.zeros((batch, n), np.int32)
    token_mask = np.zeros((batch, n), bool)
    for b, length in enumerate(lengths):
        tokens[b, :length] = rng.integers(1, config.vocab_size, length)
        token_mask[b, :length] = True
    state = np.zeros((batch, config.action_dim), np.float32)
    state[:, :8] = rng.normal(size=(batch, 8))
    return _model.Observation(
        images=images, image_masks=masks, state=state, tokenized_prompt=tokens, tokenized_prompt_mask=token_mask
    )


def pi05_tiny_a_config(dtype: str = "float32", discrete_state_input: bool = False) -> Pi0Config:
    """The pi0.5 fixture's config (fixtures/pi05_tiny_a/config.json: pi05_libero with tiny sizes)."""
    return Pi0Config(
        pi05=True,
        dtype=dtype,
        paligemma_variant="dummy",
        action_expert_variant="dummy",
        siglip_variant="mu/14",
        vocab_size=1024,
        action_horizon=10,
        discrete_state_input=discrete_state_input,
    )


def tiny_a_config(dtype: str = "float32") -> Pi0Config:
    """The fixture's config (fixtures/pi0_tiny_a/config.json)."""
    return Pi0Config(
        dtype=dtype,
        paligemma_variant="dummy",
        action_expert_variant="dummy",
        siglip_variant="mu/14",
        vocab_size=1024,
    )


def lora_tiny_a_config(dtype: str = "float32") -> Pi0Config:
    """The LoRA fixture's config (fixtures/pi0_lora_tiny_a/config.json): tiny_a's with the tiny LoRA variants."""
    return dataclasses.replace(
        tiny_a_config(dtype), paligemma_variant="dummy_lora_vlm", action_expert_variant="dummy_lora_expert"
    )
