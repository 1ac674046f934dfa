"""`create_trained_policy`: a policy from a preset (`openpi.policies.presets`), a checkpoint and its norm stats.

The factory of openpi's inference setup: resolve the checkpoint (downloading a remote one), read its norm stats,
restore the params (or draw random ones for a preset without a checkpoint), and wrap the model with the preset's
transforms. `get_preset` / `list_presets` / `PolicyPreset` are re-exported from `presets` for openpi-style callers.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from openpi import transforms as _transforms
from openpi.models import model as _model
from openpi.models import tokenizer as _tokenizer
from openpi.policies import policy as _policy
from openpi.policies.presets import PolicyPreset, get_preset, list_presets
from openpi.shared import download
from openpi.shared import normalize as _normalize

__all__ = [
    "PolicyPreset",
    "available_asset_ids",
    "create_trained_policy",
    "get_preset",
    "list_presets",
    "load_checkpoint_norm_stats",
    "make_transforms",
    "resolve_checkpoint",
]

logger = logging.getLogger(__name__)


def available_asset_ids(checkpoint_dir: str | os.PathLike) -> list[str]:
    """Asset ids under ``<checkpoint>/assets`` that hold a norm_stats.json (ids may contain '/')."""
    root = pathlib.Path(checkpoint_dir) / "assets"
    if not root.is_dir():
        return []
    return sorted(p.parent.relative_to(root).as_posix() for p in root.rglob(_normalize.FILENAME))


def load_checkpoint_norm_stats(checkpoint_dir: str | os.PathLike, asset_id: str) -> dict[str, _normalize.NormStats]:
    """Norm stats from ``<checkpoint>/assets/<asset_id>/norm_stats.json``, with an error listing the ids that exist."""
    directory = pathlib.Path(checkpoint_dir) / "assets" / asset_id
    if not (directory / _normalize.FILENAME).is_file():
        found = available_asset_ids(checkpoint_dir)
        listing = ", ".join(repr(a) for a in found) if found else f"none (no assets/*/{_normalize.FILENAME})"
        raise FileNotFoundError(
            f"No norm stats for asset id {asset_id!r} in checkpoint {checkpoint_dir}: "
            f"{directory / _normalize.FILENAME} does not exist. Asset ids in this checkpoint: {listing}. "
            "Pass asset_id=... with one of them."
        )
    return _normalize.load(directory)


def resolve_checkpoint(checkpoint_dir: str | os.PathLike) -> pathlib.Path:
    """A local checkpoint directory (downloading a remote one into the cache) that has a ``params`` subdirectory."""
    try:
        path = download.maybe_download(checkpoint_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"Checkpoint {checkpoint_dir} not found ({e}). Pass a directory holding params/ and assets/, e.g. "
            "gs://openpi-assets/checkpoints/pi0_libero or a local copy of it."
        ) from e
    if not (path / "params").is_dir():
        contents = sorted(p.name for p in path.iterdir()) if path.is_dir() else "not a directory"
        raise FileNotFoundError(
            f"{path} is not an openpi checkpoint: it has no params/ subdirectory (contents: {contents}). Pass the "
            "checkpoint root (holding params/ and assets/), or <train_dir>/<step> for a training checkpoint."
        )
    return path


def make_transforms(
    preset: PolicyPreset,
    norm_stats: Mapping[str, _normalize.NormStats],
    tokenizer: _tokenizer.PaligemmaTokenizer,
    *,
    default_prompt: str | None = None,
) -> tuple[list[_transforms.DataTransformFn], list[_transforms.DataTransformFn]]:
    """(input transforms, output transforms) for the preset's robot and model, in openpi's order.

    pi0: z-score normalisation, DeltaActions / AbsoluteActions on the robot's delta dims. pi0.5 (`pi05_libero`):
    quantile normalisation and no delta/absolute transform (upstream's `extra_delta_transform=False`: LIBERO actions
    are already deltas); the prompt carries the discretised state iff `model_config.discrete_state_input`.
    """
    use_quantiles = preset.model_type != "pi0"
    height, width = _model.IMAGE_RESOLUTION
    robot = preset.transforms
    relative = preset.model_type != "pi05" and robot.delta_action_mask is not None
    delta = [_transforms.DeltaActions(robot.delta_action_mask)] if relative else []
    absolute = [_transforms.AbsoluteActions(robot.delta_action_mask)] if relative else []
    inputs = [
        _transforms.InjectDefaultPrompt(default_prompt),
        robot.inputs(preset.model_type),
        *delta,
        _transforms.Normalize(norm_stats, use_quantiles=use_quantiles),
        _transforms.InjectDefaultPrompt(default_prompt),
        _transforms.ResizeImages(height, width),
        _transforms.TokenizePrompt(tokenizer, discrete_state_input=bool(preset.model_config.discrete_state_input)),
        _transforms.PadStatesAndActions(preset.model_config.action_dim),
    ]
    outputs = [
        _transforms.Unnormalize(norm_stats, use_quantiles=use_quantiles),
        *absolute,
        robot.outputs(),
    ]
    return inputs, outputs


def create_trained_policy(
    preset: str | PolicyPreset,
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    default_prompt: str | None = None,
    sample_kwargs: Mapping[str, Any] | None = None,
    rng_seed: int = 0,
    asset_id: str | None = None,
    tokenizer_path: str | os.PathLike | None = None,
) -> _policy.Policy:
    """Builds a policy from a preset.

    Args:
        preset: a preset name (see `list_presets`) or a `PolicyPreset`.
        checkpoint_dir: local path or URL (gs://...) of a checkpoint holding ``params/`` and
            ``assets/<asset_id>/norm_stats.json``. None: the preset's default checkpoint, or random params (from the
            preset's `param_seed`) with its packaged norm stats if it has none.
        default_prompt: used when an observation has no ``prompt``.
        sample_kwargs: static sampling options, e.g. ``{"num_steps": 10}``.
        rng_seed: seed of the policy's sampling rng (and of the noise `infer_with_latents` draws).
        asset_id: override the preset's asset id (e.g. ``"test"`` for the tiny fixture checkpoint).
        tokenizer_path: override the preset's tokenizer model.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    config = preset.model_config
    asset_id = preset.asset_id if asset_id is None else asset_id
    checkpoint = checkpoint_dir if checkpoint_dir is not None else preset.default_checkpoint

    if checkpoint is None:
        if preset.default_norm_stats_dir is None:
            raise ValueError(f"Preset {preset.name!r} has no default checkpoint: pass checkpoint_dir=...")
        logger.info("Preset %s: random params from seed %d (no checkpoint)", preset.name, preset.param_seed)
        model = config.create(jax.random.key(preset.param_seed))
        norm_stats = _normalize.load(preset.default_norm_stats_dir)
        source = f"random(seed={preset.param_seed})"
    else:
        ckpt = resolve_checkpoint(checkpoint)
        # Check the norm stats before the (possibly slow) weight restore.
        norm_stats = load_checkpoint_norm_stats(ckpt, asset_id)
        dtype = jnp.bfloat16 if config.dtype == "bfloat16" else None
        logger.info("Loading params from %s (dtype %s)", ckpt / "params", dtype or "as stored")
        params = _model.restore_params(ckpt / "params", dtype=dtype)
        model = config.load(params)
        source = str(checkpoint)

    tokenizer = _tokenizer.PaligemmaTokenizer(
        config.max_token_len, tokenizer_path if tokenizer_path is not None else preset.tokenizer_path
    )
    inputs, outputs = make_transforms(preset, norm_stats, tokenizer, default_prompt=default_prompt)
    return _policy.Policy(
        model,
        transforms=inputs,
        output_transforms=outputs,
        rng=jax.random.key(rng_seed),
        sample_kwargs=sample_kwargs,
        metadata={
            "preset": preset.name,
            "checkpoint": source,
            "asset_id": asset_id if checkpoint is not None else None,
            "model_config": config.describe() if hasattr(config, "describe") else repr(config),
            "tokenizer": str(tokenizer.model_path),
        },
    )
