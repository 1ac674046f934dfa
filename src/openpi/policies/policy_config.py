"""Policy presets and `create_trained_policy` (openpi's `pi0_libero` inference setup).

Presets:

* ``pi0_libero``: full-size pi0 (PaliGemma gemma_2b + gemma_300m action expert, SigLIP So400m/14), bf16, the
  released checkpoint ``gs://openpi-assets/checkpoints/pi0_libero`` with asset id ``physical-intelligence/libero``
  and the PaliGemma tokenizer (downloaded once into the cache; needs the ``gcs`` extra).
* ``pi0_libero_low_mem_finetune``: the same model with LoRA adapters (``gemma_2b_lora`` + ``gemma_300m_lora``), as
  openpi's low-memory fine-tuning config trains it; no default checkpoint (pass your fine-tune's). A preset for any
  other LoRA fine-tune only swaps the variant names.
* ``pi0_libero_tiny``: a tiny pi0 (Gemma "dummy" experts, SigLIP mu/14, vocab 1024) for smoke tests and
  development. Without a checkpoint it uses random weights from a seed and the tokenizer and identity-like norm
  stats shipped in `openpi.assets` (no download at all). It can also load a tiny checkpoint (e.g. the test fixture,
  asset id ``test``).
* ``pi05_libero``: full-size pi0.5 as upstream's ``pi05_libero`` (``Pi0Config(pi05=True, action_horizon=10,
  discrete_state_input=False)``: the prompt carries no state, so the actions do not depend on the robot state), bf16,
  checkpoint ``gs://openpi-assets/checkpoints/pi05_libero``, asset id ``physical-intelligence/libero``; quantile
  normalisation, no delta/absolute action transform.
* ``pi0_organism_tiny``: the control organisms' config (``openpi.training.control_organisms``): pi0_libero_tiny's
  Gemma and SigLIP sizes with 56-pixel patches (16 tokens per camera) and horizon 10, so that it trains in minutes
  on CPU. Checkpoints: ``tests/data/organisms/{positive,negative}`` (asset id ``organism``, identity norm stats);
  without one, random weights (the untrained control of the same config).
* ``pi05_libero_tiny``: a tiny pi0.5 (as ``pi0_libero_tiny``, horizon 10, text window 200) with shipped assets
  (tokenizer + identity-like norm stats with quantiles). Upstream initialises the adaptive norms to zero, so with
  random params the action expert's residual branches are gated off (its actions ignore the observation).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from openpi import assets as _assets
from openpi import transforms as _transforms
from openpi.models import model as _model
from openpi.models import tokenizer as _tokenizer
from openpi.models.pi0_config import Pi0Config
from openpi.policies import libero_policy
from openpi.policies import policy as _policy
from openpi.shared import download
from openpi.shared import normalize as _normalize

logger = logging.getLogger(__name__)

# LIBERO: the first 6 action dims (end-effector deltas) are relative to the state, the gripper is absolute.
LIBERO_DELTA_MASK = _transforms.make_bool_mask(6, -1)


@dataclasses.dataclass(frozen=True)
class PolicyPreset:
    """Everything needed to build a LIBERO pi0 / pi0.5 policy (`model_type` "pi05" with `Pi0Config(pi05=True)`)."""

    name: str
    model_config: Pi0Config
    # Norm stats are read from <checkpoint>/assets/<asset_id>/norm_stats.json.
    asset_id: str
    # Checkpoint used when none is given (local path or URL); None: random params from `param_seed`.
    default_checkpoint: str | None = None
    # SentencePiece model (local path or URL); None: PaliGemma's, from gs://big_vision (cached).
    tokenizer_path: str | None = None
    # Norm stats used with random params (a directory holding norm_stats.json).
    default_norm_stats_dir: str | None = None
    model_type: libero_policy.ModelType = "pi0"
    param_seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        if (self.model_type == "pi05") != bool(getattr(self.model_config, "pi05", False)):
            raise ValueError(
                f"Preset {self.name!r}: model_type={self.model_type!r} does not match the model config "
                f"(pi05={getattr(self.model_config, 'pi05', False)}); use model_type='pi05' exactly with "
                "Pi0Config(pi05=True)."
            )


def _tiny_assets(name: str = "pi0_libero_tiny") -> str:
    return str(_assets.asset_dir(name))


def _tiny_config(**kwargs) -> Pi0Config:
    return Pi0Config(
        dtype="float32",
        paligemma_variant="dummy",
        action_expert_variant="dummy",
        siglip_variant="mu/14",
        vocab_size=1024,
        **kwargs,
    )


def _presets() -> dict[str, PolicyPreset]:
    tiny_dir = _tiny_assets()
    tiny05_dir = _tiny_assets("pi05_libero_tiny")
    return {
        "pi0_libero": PolicyPreset(
            name="pi0_libero",
            model_config=Pi0Config(),
            asset_id="physical-intelligence/libero",
            default_checkpoint="gs://openpi-assets/checkpoints/pi0_libero",
            description="full-size pi0 fine-tuned on LIBERO (openpi release), bf16",
        ),
        "pi0_libero_low_mem_finetune": PolicyPreset(
            name="pi0_libero_low_mem_finetune",
            model_config=Pi0Config(paligemma_variant="gemma_2b_lora", action_expert_variant="gemma_300m_lora"),
            asset_id="physical-intelligence/libero",
            description="a LoRA fine-tune from openpi's pi0_libero_low_mem_finetune (pass checkpoint_dir), bf16",
        ),
        "pi0_libero_tiny": PolicyPreset(
            name="pi0_libero_tiny",
            model_config=_tiny_config(),
            asset_id="pi0_libero_tiny",
            default_checkpoint=None,
            tokenizer_path=os.path.join(tiny_dir, "tokenizer.model"),
            default_norm_stats_dir=tiny_dir,
            description="tiny random-weight pi0 for tests and development (no download), float32",
        ),
        "pi05_libero": PolicyPreset(
            name="pi05_libero",
            model_config=Pi0Config(pi05=True, action_horizon=10, discrete_state_input=False),
            asset_id="physical-intelligence/libero",
            default_checkpoint="gs://openpi-assets/checkpoints/pi05_libero",
            model_type="pi05",
            description="full-size pi0.5 fine-tuned on LIBERO (openpi release; no state in the prompt), bf16",
        ),
        "pi05_libero_tiny": PolicyPreset(
            name="pi05_libero_tiny",
            model_config=_tiny_config(pi05=True, action_horizon=10, discrete_state_input=False),
            asset_id="pi05_libero_tiny",
            default_checkpoint=None,
            tokenizer_path=os.path.join(tiny05_dir, "tokenizer.model"),
            default_norm_stats_dir=tiny05_dir,
            model_type="pi05",
            description="tiny random-weight pi0.5 for tests and development (no download), float32",
        ),
        "pi0_organism_tiny": PolicyPreset(
            name="pi0_organism_tiny",
            model_config=Pi0Config(
                dtype="float32",
                paligemma_variant="dummy",
                action_expert_variant="dummy",
                siglip_variant="mu/56",
                vocab_size=1024,
                action_horizon=10,
            ),
            asset_id="organism",
            default_checkpoint=None,
            tokenizer_path=os.path.join(tiny_dir, "tokenizer.model"),
            default_norm_stats_dir=tiny_dir,
            description="the control organisms' tiny pi0 (16 tokens per camera, horizon 10), float32; without a "
            "checkpoint random weights (the untrained control), trained ones in tests/data/organisms/",
        ),
    }


def get_preset(name: str) -> PolicyPreset:
    """The preset called `name`; a ValueError lists the presets otherwise."""
    presets = _presets()
    if name not in presets:
        listing = "; ".join(f"{k}: {v.description}" for k, v in presets.items())
        raise ValueError(f"Unknown policy preset {name!r}. Available presets: {listing}.")
    return presets[name]


def list_presets() -> tuple[str, ...]:
    return tuple(_presets())


# ---------------------------------------------------------------------------------------------------------------------


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
    """(input transforms, output transforms) for LIBERO inference, in openpi's order.

    pi0: z-score normalisation, DeltaActions / AbsoluteActions on the first 6 dims. pi0.5 (`pi05_libero`): quantile
    normalisation and no delta/absolute transform (upstream's `extra_delta_transform=False`: LIBERO actions are
    already deltas); the prompt carries the discretised state iff `model_config.discrete_state_input`.
    """
    use_quantiles = preset.model_type != "pi0"
    delta = [] if preset.model_type == "pi05" else [_transforms.DeltaActions(LIBERO_DELTA_MASK)]
    absolute = [] if preset.model_type == "pi05" else [_transforms.AbsoluteActions(LIBERO_DELTA_MASK)]
    height, width = _model.IMAGE_RESOLUTION
    inputs = [
        _transforms.InjectDefaultPrompt(default_prompt),
        libero_policy.LiberoInputs(preset.model_type),
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
        libero_policy.LiberoOutputs(),
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
    """Builds a LIBERO policy from a preset.

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
