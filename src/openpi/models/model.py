"""Model inputs (`Observation`), their preprocessing, and reading openpi params checkpoints.

Shared by every model in the package; compatible with upstream openpi's `openpi.models.model` names.
"""

import dataclasses
import logging
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jaxtyping import ArrayLike, Bool, Float, Int

from openpi.shared import image_tools

logger = logging.getLogger(__name__)

# Camera order of the prefix: the SigLIP tokens of each key, in this order, precede the text tokens.
IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
IMAGE_RESOLUTION = (224, 224)

Params = dict[str, Any]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Observation:
    """What the model sees. `*b` is any batch shape (pi0 uses one batch axis)."""

    # float32 in [-1, 1], [*b, h, w, 3], keyed by camera name (see IMAGE_KEYS).
    images: dict[str, Float[ArrayLike, "*b h w c"]]
    # True where the camera is present; a missing entry means present (filled in by preprocess_observation).
    image_masks: dict[str, Bool[ArrayLike, "*b"]]
    # Proprioceptive state, normalized and zero-padded to action_dim.
    state: Float[ArrayLike, "*b s"]
    # Prompt token ids and their validity mask; None for prompt-free models.
    tokenized_prompt: Int[ArrayLike, "*b l"] | None = None
    tokenized_prompt_mask: Bool[ArrayLike, "*b l"] | None = None
    # Only used by pi0-FAST; kept for openpi compatibility.
    token_ar_mask: Int[ArrayLike, "*b l"] | None = None
    token_loss_mask: Bool[ArrayLike, "*b l"] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Observation":
        """Builds an Observation from openpi's dict layout (keys `image`, `image_mask`, `state`, ...).

        uint8 images are converted to float32 in [-1, 1] as x / 255 * 2 - 1. The input dict is not modified.
        """
        missing = [k for k in ("image", "state") if k not in data]
        if missing:
            raise ValueError(
                f"Observation.from_dict: missing key(s) {missing}; got keys {sorted(data)}. Expected 'image' "
                "(dict camera -> [*b, h, w, 3]), 'state', and optionally 'image_mask', 'tokenized_prompt' and "
                "'tokenized_prompt_mask'."
            )
        if ("tokenized_prompt" in data) != ("tokenized_prompt_mask" in data):
            raise ValueError(
                "Observation.from_dict: 'tokenized_prompt' and 'tokenized_prompt_mask' must be given together or not "
                f"at all; got keys {sorted(data)}. The TokenizePrompt transform produces both."
            )
        images = {}
        for key, image in data["image"].items():
            if image.dtype == np.uint8:
                # Works for numpy and jax arrays alike.
                image = image.astype(np.float32) / 255.0 * 2.0 - 1.0
            images[key] = image
        return cls(
            images=images,
            image_masks=dict(data.get("image_mask", {})),
            state=data["state"],
            tokenized_prompt=data.get("tokenized_prompt"),
            tokenized_prompt_mask=data.get("tokenized_prompt_mask"),
            token_ar_mask=data.get("token_ar_mask"),
            token_loss_mask=data.get("token_loss_mask"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The openpi dict layout; `from_dict(obs.to_dict())` gives back an equal Observation."""
        result: dict[str, Any] = {"image": dict(self.images), "image_mask": dict(self.image_masks), "state": self.state}
        for name in ("tokenized_prompt", "tokenized_prompt_mask", "token_ar_mask", "token_loss_mask"):
            if (value := getattr(self, name)) is not None:
                result[name] = value
        return result


def preprocess_observation(
    rng: jax.Array | None,
    observation: Observation,
    *,
    train: bool = False,
    image_keys: Sequence[str] = IMAGE_KEYS,
    image_resolution: tuple[int, int] = IMAGE_RESOLUTION,
) -> Observation:
    """Prepares an observation for the model: every camera in `image_keys`, at `image_resolution`, with a mask.

    Images not at the resolution are resized with padding (pad value -1, i.e. black); images already there pass
    through untouched. Missing masks default to True. Cameras not in `image_keys` are dropped.

    Training augmentation is not implemented in this fork, so `train=True` raises rather than silently training on
    unaugmented images. `rng` is unused for `train=False` and may be None.
    """
    del rng
    if train:
        raise ValueError(
            "preprocess_observation(train=True): image augmentation is not implemented in this fork. Call it with "
            "train=False (no augmentation), or add augmentation before relying on this for training."
        )
    missing = [k for k in image_keys if k not in observation.images]
    if missing:
        raise ValueError(
            f"Observation is missing image(s) {missing}; it has {sorted(observation.images)}. The model needs all of "
            f"{list(image_keys)}: give an absent camera a black image (zeros as uint8, -1 as float) and a False "
            "image mask, as LiberoInputs does for the right wrist."
        )

    batch_shape = jnp.shape(observation.state)[:-1]
    images, masks = {}, {}
    for key in image_keys:
        image = observation.images[key]
        if tuple(image.shape[-3:-1]) != tuple(image_resolution):
            logger.info("Resizing image %s from %s to %s", key, image.shape[-3:-1], image_resolution)
            image = image_tools.resize_with_pad_jax(jnp.asarray(image), *image_resolution)
        images[key] = image
        if key in observation.image_masks:
            masks[key] = jnp.asarray(observation.image_masks[key])
        else:
            masks[key] = jnp.ones(batch_shape, dtype=jnp.bool_)

    return Observation(
        images=images,
        image_masks=masks,
        state=observation.state,
        tokenized_prompt=observation.tokenized_prompt,
        tokenized_prompt_mask=observation.tokenized_prompt_mask,
        token_ar_mask=observation.token_ar_mask,
        token_loss_mask=observation.token_loss_mask,
    )


# Any of these marks a directory written by orbax.
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")


def _check_checkpoint_dir(path: pathlib.Path) -> None:
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "not found"
        raise FileNotFoundError(
            f"checkpoint params directory {what}: {path} — pass the directory that contains _METADATA, usually "
            "<checkpoint>/params"
        )
    if not any((path / m).exists() for m in _ORBAX_MARKERS):
        found = sorted(p.name for p in path.iterdir())
        shown = ", ".join(found[:10]) + (f", ... ({len(found)} entries)" if len(found) > 10 else "")
        hint = (
            f" It has a 'params' subdirectory: pass {path / 'params'}."
            if (path / "params").is_dir()
            else " Pass the directory that contains _METADATA, usually <checkpoint>/params."
        )
        raise ValueError(
            f"{path} is not an orbax checkpoint: it has none of {list(_ORBAX_MARKERS)} (found: {shown or 'nothing'})."
            + hint
        )


def restore_params(
    params_path: str | pathlib.Path,
    *,
    restore_type: type[np.ndarray] | type[jax.Array] = jax.Array,
    dtype: Any = None,
    sharding: jax.sharding.Sharding | None = None,
) -> Params:
    """Reads an openpi params checkpoint (`<checkpoint>/params`) into a plain nested dict.

    Accepts both layouts openpi writes: pure-dict checkpoints and nnx.State ones, whose every leaf path ends in
    `value` (stripped here). `dtype` casts every leaf (openpi serves with bfloat16). For `jax.Array` without a
    sharding the params are replicated over all devices.
    """
    if isinstance(params_path, str) and "://" in params_path:
        raise ValueError(
            f"restore_params reads local directories only, got {params_path!r}: fetch it first with "
            "openpi.shared.download.maybe_download(...)."
        )
    path = pathlib.Path(params_path).expanduser().resolve()
    _check_checkpoint_dir(path)

    if restore_type is jax.Array and sharding is None:
        mesh = jax.sharding.Mesh(jax.devices(), ("x",))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    elif restore_type is np.ndarray:
        sharding = None
    elif restore_type is not jax.Array:
        raise ValueError(f"restore_type must be np.ndarray or jax.Array, got {restore_type!r}.")

    checkpointer = ocp.PyTreeCheckpointer()
    # Newer orbax wraps the tree metadata in StepMetadata(item_metadata=TreeMetadata(tree=...)).
    metadata = checkpointer.metadata(path)
    metadata = getattr(metadata, "item_metadata", metadata)
    metadata = getattr(metadata, "tree", metadata)
    if not isinstance(metadata, Mapping) or "params" not in metadata:
        keys = sorted(metadata) if isinstance(metadata, Mapping) else type(metadata).__name__
        raise ValueError(
            f"{path} has no top-level 'params' item (found {keys}). openpi saves {{'params': params}}; is this a "
            "train_state or some other orbax item rather than <checkpoint>/params?"
        )

    item = {"params": metadata["params"]}
    restore_args = jax.tree.map(
        lambda _: ocp.ArrayRestoreArgs(sharding=sharding, restore_type=restore_type, dtype=dtype), item
    )
    params = checkpointer.restore(path, ocp.args.PyTreeRestore(item=item, restore_args=restore_args))["params"]

    flat = flax.traverse_util.flatten_dict(params)
    # nnx.State checkpoints end every path in "value". Strip only that trailing component, and only when all paths
    # have it: SigLIP has a submodule literally named `value` (MultiHeadDotProductAttention_0/value/kernel).
    if flat and all(k[-1] == "value" for k in flat):
        flat = {k[:-1]: v for k, v in flat.items()}
    return flax.traverse_util.unflatten_dict(flat)


def _flat_shapes(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {"/".join(map(str, k)): tuple(np.shape(v)) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def check_params_match(expected: Mapping[str, Any], actual: Mapping[str, Any], *, what: str = "params") -> None:
    """Checks that two nested dicts of arrays (or ShapeDtypeStructs) have the same paths and shapes; dtypes may differ.

    Raises ValueError naming the first missing or unexpected path (with counts) or the first shape mismatch.
    """
    hint = (
        "Does the checkpoint match the model config? (e.g. pi0_libero expects paligemma gemma_2b + action expert "
        "gemma_300m with SigLIP So400m/14; pi0 and pi05 checkpoints differ too.)"
    )
    exp, act = _flat_shapes(expected), _flat_shapes(actual)
    missing = sorted(exp.keys() - act.keys())
    unexpected = sorted(act.keys() - exp.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]}, expected shape {exp[missing[0]]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]}, shape {act[unexpected[0]]})")
        extra = ""
        if unexpected and all(p.endswith("/value") for p in unexpected):
            extra = " The unexpected paths end in '/value' (nnx.State layout): read the checkpoint with restore_params."
        raise ValueError(
            f"{what} do not match the model's param tree: {'; '.join(parts)} "
            f"({len(exp)} expected, {len(act)} given).{extra} {hint}"
        )
    for path in sorted(exp):
        if exp[path] != act[path]:
            raise ValueError(
                f"{what}: shape mismatch at {path}: the model expects {exp[path]}, got {act[path]}. {hint}"
            )
