"""LIBERO <-> pi0 data mapping (openpi's `libero_policy`).

Raw LIBERO observations (as the LIBERO client sends them) have the flat keys ``observation/image`` (agent view),
``observation/wrist_image``, ``observation/state`` (8 dims: eef pos 3, axis-angle 3, gripper qpos 2) and
``prompt``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
from jaxtyping import Float, UInt8

from openpi import transforms as _transforms

ModelType = Literal["pi0", "pi0_fast", "pi05"]
MODEL_TYPES: tuple[str, ...] = ("pi0", "pi0_fast", "pi05")

# LIBERO's action space: 6 end-effector deltas + 1 gripper.
LIBERO_ACTION_DIM = 7


def parse_image(image: np.ndarray) -> UInt8[np.ndarray, "h w 3"]:
    """Float images in [0, 1] become uint8 (``255 * x``, truncated); CHW becomes HWC."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"Expected one image of shape [H, W, 3] or [3, H, W], got shape {image.shape}.")
    if np.issubdtype(image.dtype, np.floating):
        image = (255 * image).astype(np.uint8)
    if image.shape[0] == 3 and image.shape[-1] != 3:
        image = np.transpose(image, (1, 2, 0))
    return image


@dataclasses.dataclass(frozen=True)
class LiberoInputs:
    """Maps a raw LIBERO observation to the model's input dict (``state``, ``image``, ``image_mask``).

    The third camera slot (``right_wrist_0_rgb``) is a zero image; it is masked out except for pi0-FAST.
    ``prompt`` and ``actions`` are passed through when present.
    """

    model_type: ModelType = "pi0"

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"Unknown model_type {self.model_type!r}; expected one of {MODEL_TYPES}.")

    def __call__(self, data: dict) -> dict:
        missing = [k for k in ("observation/image", "observation/wrist_image", "observation/state") if k not in data]
        if missing:
            raise KeyError(
                f"LiberoInputs needs the LIBERO observation keys {missing}, which are missing. Keys present: "
                f"{sorted(data)}. Build observations with openpi.envs.libero (or the LIBERO client's format)."
            )
        base = parse_image(data["observation/image"])
        wrist = parse_image(data["observation/wrist_image"])
        inputs = {
            "state": np.asarray(data["observation/state"]),
            "image": {"base_0_rgb": base, "left_wrist_0_rgb": wrist, "right_wrist_0_rgb": np.zeros_like(base)},
            "image_mask": {
                "base_0_rgb": np.True_,
                "left_wrist_0_rgb": np.True_,
                "right_wrist_0_rgb": np.True_ if self.model_type == "pi0_fast" else np.False_,
            },
        }
        for key in ("actions", "prompt"):
            if key in data:
                inputs[key] = data[key]
        return inputs


@dataclasses.dataclass(frozen=True)
class LiberoOutputs:
    """Keeps the first 7 action dims (LIBERO's action space) of the [H, action_dim] chunk."""

    def __call__(self, data: dict) -> dict:
        actions: Float[np.ndarray, "h d"] = np.asarray(_transforms.require_key(data, "actions", "LiberoOutputs"))
        if actions.shape[-1] < LIBERO_ACTION_DIM:
            raise ValueError(f"LiberoOutputs needs at least {LIBERO_ACTION_DIM} action dims, got {actions.shape}.")
        return {"actions": actions[..., :LIBERO_ACTION_DIM]}
