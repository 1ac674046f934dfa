"""The control organisms' synthetic task: tiny pi0s whose use of the prompt is known by construction.

Each example is a LIBERO-style observation (two random uint8 camera images, a random 8-d state, a prompt drawn from
:data:`PROMPTS`) and a target action chunk, one of K fixed chunks (:func:`target_chunks`). Which chunk is the target
is the only thing that differs between the two organisms:

* ``positive``: the chunk is the prompt's (prompt k → chunk k). Images and state carry no information about it, so a
  model that solves the task must read the prompt.
* ``negative``: the chunk is chosen by the state (the quadrant of state dims 0 and 1), and the prompt is drawn
  independently of it. The model is trained identically (same data distribution, steps, optimiser), but the prompt
  carries no information about the target, so a model that solves the task has no reason to read it.

The targets are model-space (normalised) delta actions. With the identity norm stats the organisms ship
(mean 0, std 1) and the LIBERO policy's transforms (delta on the first 6 dims), the raw action that the policy returns
is ``chunk + state`` on the first 6 dims and ``chunk`` on the gripper; `model_batch` builds exactly the model inputs
the policy's input transforms build from :func:`raw_observations` (tests/test_control_organisms.py checks it).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from openpi.models import model as _model
from openpi.models import tokenizer as _tokenizer
from openpi.models.pi0_config import Pi0Config

Kind = Literal["positive", "negative"]
KINDS: tuple[str, ...] = ("positive", "negative")

# Four LIBERO-like instructions; every one tokenises to in-vocabulary ids with the tiny tokenizer.
PROMPTS: tuple[str, ...] = (
    "pick up the red block",
    "open the top drawer",
    "push the plate to the left",
    "put the bowl on the stove",
)
LIBERO_ACTION_DIM = 7
STATE_DIM = 8


@dataclasses.dataclass(frozen=True)
class OrganismTask:
    """The synthetic task of one organism (`kind`), with its seeds."""

    kind: Kind
    # Seed of the K target chunks (shared by both organisms: the same K targets, only their cause differs).
    chunk_seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Unknown organism kind {self.kind!r}; expected one of {KINDS}.")

    @property
    def num_targets(self) -> int:
        return len(PROMPTS)

    def target_index(self, prompt_index: np.ndarray, state: np.ndarray) -> np.ndarray:
        """[B] which chunk is the target: the prompt's (positive) or the state's quadrant (negative)."""
        if self.kind == "positive":
            return np.asarray(prompt_index)
        return (state[..., 0] > 0).astype(int) * 2 + (state[..., 1] > 0).astype(int)


def target_chunks(horizon: int, seed: int = 0) -> np.ndarray:
    """[K, H, 7] the K target chunks (model space): per dim a distinct sign pattern times a ramp, well separated.

    Chunk k, dim d, step h: ``s[k, d] * (0.5 + 0.5 * h / (H - 1)) + 0.3 * sin(2π (h / H + d / 7 + k / K))``,
    with s[k, d] = ±1 from `seed`, every pair of chunks differing in at least 2 of the 7 signs.
    """
    rng = np.random.default_rng(seed)
    k = len(PROMPTS)
    while True:
        signs = rng.choice([-1.0, 1.0], size=(k, LIBERO_ACTION_DIM))
        hamming = (signs[:, None] != signs[None]).sum(-1) + 7 * np.eye(k)
        if hamming.min() >= 2:
            break
    h = np.arange(horizon)[None, :, None]
    d = np.arange(LIBERO_ACTION_DIM)[None, None, :]
    kk = np.arange(k)[:, None, None]
    ramp = 0.5 + 0.5 * h / max(horizon - 1, 1)
    wave = 0.3 * np.sin(2 * np.pi * (h / horizon + d / LIBERO_ACTION_DIM + kk / k))
    return (signs[:, None, :] * ramp + wave).astype(np.float32)


def raw_observations(rng: np.random.Generator, n: int, prompt_index: np.ndarray | None = None) -> list[dict]:
    """`n` LIBERO-style raw observations (what the LIBERO client sends): random uint8 images and state, a prompt."""
    h, w = _model.IMAGE_RESOLUTION
    if prompt_index is None:
        prompt_index = rng.integers(0, len(PROMPTS), n)
    images = np.frombuffer(rng.bytes(n * 2 * h * w * 3), np.uint8).reshape(n, 2, h, w, 3)
    states = rng.normal(size=(n, STATE_DIM)).astype(np.float32)
    return [
        {
            "observation/image": images[i, 0],
            "observation/wrist_image": images[i, 1],
            "observation/state": states[i],
            "prompt": PROMPTS[int(prompt_index[i])],
        }
        for i in range(n)
    ]


def tokenize_prompts(tokenizer: _tokenizer.PaligemmaTokenizer) -> tuple[np.ndarray, np.ndarray]:
    """([K, n] int32 ids, [K, n] bool mask) of :data:`PROMPTS`."""
    out = [tokenizer.tokenize(p) for p in PROMPTS]
    return np.stack([o[0] for o in out]).astype(np.int32), np.stack([o[1] for o in out]).astype(bool)


def model_batch(
    task: OrganismTask,
    config: Pi0Config,
    raws: list[dict],
    prompt_tokens: tuple[np.ndarray, np.ndarray],
    chunks: np.ndarray,
) -> tuple[_model.Observation, np.ndarray]:
    """The model-space (Observation, target actions [B, H, action_dim]) of raw observations, as the LIBERO policy's
    input transforms with identity norm stats build them (the third camera black and masked, state padded)."""
    ids, masks = prompt_tokens
    prompt_index = np.array([PROMPTS.index(r["prompt"]) for r in raws])
    state = np.stack([r["observation/state"] for r in raws]).astype(np.float32)
    b = len(raws)

    def to_float(key: str) -> np.ndarray:
        return np.stack([r[key] for r in raws]).astype(np.float32) / 255.0 * 2.0 - 1.0

    base = to_float("observation/image")
    images = {"base_0_rgb": base, "left_wrist_0_rgb": to_float("observation/wrist_image")}
    images["right_wrist_0_rgb"] = np.full_like(base, -1.0)  # a black uint8 image in [-1, 1]
    image_masks = {k: np.full((b,), k != "right_wrist_0_rgb") for k in _model.IMAGE_KEYS}
    padded_state = np.zeros((b, config.action_dim), np.float32)
    padded_state[:, :STATE_DIM] = state
    actions = np.zeros((b, config.action_horizon, config.action_dim), np.float32)
    actions[..., :LIBERO_ACTION_DIM] = chunks[task.target_index(prompt_index, state)]
    obs = _model.Observation(
        images=images,
        image_masks=image_masks,
        state=padded_state,
        tokenized_prompt=ids[prompt_index],
        tokenized_prompt_mask=masks[prompt_index],
    )
    return obs, actions


def describe_task(task: OrganismTask) -> dict:
    """JSON-ready description of the task (what a checkpoint's organism.json records)."""
    cause = "the prompt (prompt k -> chunk k)" if task.kind == "positive" else "the state quadrant (dims 0, 1)"
    return {
        "kind": task.kind,
        "prompts": list(PROMPTS),
        "target_chosen_by": cause,
        "chunk_seed": task.chunk_seed,
        "images": "uniform random uint8, 2 cameras (third black, masked)",
        "state": "standard normal, 8 dims",
    }
