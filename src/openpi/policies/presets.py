"""Named policy presets: each names its model config, the simulator it acts in and the robot transforms.

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
* ``pi05_libero_tiny``: a tiny pi0.5 (as ``pi0_libero_tiny``, horizon 10, text window 200) with shipped assets
  (tokenizer + identity-like norm stats with quantiles). Upstream initialises the adaptive norms to zero, so with
  random params the action expert's residual branches are gated off (its actions ignore the observation).
* ``pi0_organism_tiny``: the control organisms' config (``openpi.training.control_organisms``): pi0_libero_tiny's
  Gemma and SigLIP sizes with 56-pixel patches (16 tokens per camera) and horizon 10, so that it trains in minutes
  on CPU. Checkpoints: ``tests/data/organisms/{positive,negative}`` (asset id ``organism``, identity norm stats);
  without one, random weights (the untrained control of the same config).

`openpi.policies.policy_config.create_trained_policy` builds a policy from a preset.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from openpi import assets as _assets
from openpi import transforms as _transforms
from openpi.models.pi0_config import Pi0Config
from openpi.policies import libero_policy


@dataclasses.dataclass(frozen=True)
class RobotTransforms:
    """The robot-specific ends of the transform pipeline (openpi's "data transforms").

    ``inputs(model_type)`` maps the simulator's policy input to the model's keys (images, masks, state);
    ``outputs()`` maps the model's action chunk back to the robot's action space. ``delta_action_mask``: the action
    dims that are deltas from the state (True) rather than absolute; None: all absolute.
    """

    inputs: Callable[[libero_policy.ModelType], _transforms.DataTransformFn]
    outputs: Callable[[], _transforms.DataTransformFn]
    delta_action_mask: tuple[bool, ...] | None = None


# LIBERO: the first 6 action dims (end-effector deltas) are relative to the state, the gripper is absolute.
LIBERO_DELTA_MASK = _transforms.make_bool_mask(6, -1)
LIBERO = RobotTransforms(libero_policy.LiberoInputs, libero_policy.LiberoOutputs, LIBERO_DELTA_MASK)


@dataclasses.dataclass(frozen=True)
class PolicyPreset:
    """Everything needed to build a policy and run it in its simulator."""

    name: str
    model_config: Pi0Config
    # Norm stats are read from <checkpoint>/assets/<asset_id>/norm_stats.json.
    asset_id: str
    # The simulator (`openpi.envs.get(env)`) whose policy inputs `transforms` take.
    env: str = "libero"
    transforms: RobotTransforms = LIBERO
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
        if (self.model_type == "pi05") != bool(self.model_config.pi05):
            raise ValueError(
                f"Preset {self.name!r}: model_type={self.model_type!r} does not match the model config "
                f"(pi05={self.model_config.pi05}); use model_type='pi05' exactly with Pi0Config(pi05=True)."
            )


def _tiny_config(**kwargs) -> Pi0Config:
    """The tiny presets' model: Gemma "dummy" experts, SigLIP mu/14, vocab 1024, float32 (overridable)."""
    sizes = dict(dtype="float32", paligemma_variant="dummy", action_expert_variant="dummy", siglip_variant="mu/14")
    return Pi0Config(**{**sizes, "vocab_size": 1024, **kwargs})


def _presets() -> dict[str, PolicyPreset]:
    tiny_dir = str(_assets.asset_dir("pi0_libero_tiny"))
    tiny05_dir = str(_assets.asset_dir("pi05_libero_tiny"))
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
            model_config=_tiny_config(siglip_variant="mu/56", action_horizon=10),
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
