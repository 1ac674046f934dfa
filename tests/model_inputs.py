"""Builders for model inputs in tests (fixture observation, random observations for any config)."""

import dataclasses

import numpy as np

from openpi.models import model as _model
from openpi.models.pi0_config import Pi0Config


def fixture_observation(inputs: dict[str, np.ndarray]) -> _model.Observation:
    keys = _model.IMAGE_KEYS
    return _model.Observation(
        images={k: inputs[f"image_{k}"] for k in keys},
        image_masks={k: inputs[f"image_mask_{k}"] for k in keys},
        state=inputs["state"],
        tokenized_prompt=inputs["tokenized_prompt"],
        tokenized_prompt_mask=inputs["tokenized_prompt_mask"],
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
