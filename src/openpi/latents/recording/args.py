"""The argument groups the producers' CLIs share, each spelled and checked once.

The collection (`collect.args.CollectionArgs`), the policy server (`serving.args.ServeArgs`) and the replay
(`replay.plan.ReplayArgs`) are flat dataclasses built from these groups, so a flag keeps one spelling (``--preset``,
``--checkpoint``, ``--num-denoise-steps``, ``--capture.*``, ``--output-dir``, ``--resume``, ...) and the manifest's
``arguments`` keep their keys. A CLI adds its own fields after the groups and may redeclare a group field to change its
default (the server's and the replay's ``--output-dir``).

* :class:`PolicyArgs` (the collection, the server): which model runs, and how many denoising steps.
* :class:`CaptureArgs` (the collection, the server): what each record holds.
* :class:`StoreArgs` (the collection, the server, the replay): where the store goes and how it is (re)opened.
* :func:`check_intervention` (the collection's ``--condition.intervention``, the server's ``--intervention``): an
  intervention checked against the model before anything loads.

The replay takes its model, capture and steps from its source, so it uses only the store group; the analysis CLI
writes no store and runs no policy, so it uses none.
"""

from __future__ import annotations

import dataclasses

from openpi.models import intervention as iv
from openpi.models.capture import CaptureSpec
from openpi.models.pi0_config import Pi0Config
from openpi.policies import presets

DEFAULT_PRESET = "pi0_libero"
# Store arguments a resumed run may change: how the store is written, not what an episode records.
STORE_RESUME_IGNORE = frozenset({"arguments.queue_size", "arguments.break_stale_lock"})


@dataclasses.dataclass(frozen=True)
class PolicyArgs:
    # Policy preset: "pi0_libero" / "pi05_libero" (the released full-size checkpoints), "pi0_libero_low_mem_finetune"
    # (LoRA; pass --checkpoint) or "pi0_libero_tiny" / "pi05_libero_tiny" (random weights, no download; for smoke
    # tests). The preset names the simulator.
    preset: str = DEFAULT_PRESET
    # Checkpoint directory (local or gs://). Default: the preset's (pi0_libero: gs://openpi-assets/checkpoints/pi0_libero).
    checkpoint: str | None = None
    # Norm-stats asset id inside <checkpoint>/assets (default: the preset's, "physical-intelligence/libero").
    asset_id: str | None = None
    # Flow-matching (Euler) steps per inference.
    num_denoise_steps: int = 10

    def check_policy(self, preset_name: str | None = None) -> presets.PolicyPreset:
        """The preset (``preset_name``, else --preset), once the policy arguments are checked (ValueError naming the
        flag)."""
        preset = presets.get_preset(preset_name or self.preset)
        if self.num_denoise_steps < 1:
            raise ValueError(
                f"--num-denoise-steps must be >= 1 (flow-matching Euler steps per inference; openpi uses 10), "
                f"got {self.num_denoise_steps}."
            )
        return preset


@dataclasses.dataclass(frozen=True)
class CaptureArgs:
    # What to record at each inference.
    capture: CaptureSpec = CaptureSpec()
    # Keep the preprocessed 224x224 camera images in each step record (what a replay feeds its control model).
    store_images: bool = True

    def check_capture(self, config: Pi0Config, num_steps: int) -> None:
        """The capture spec against the model's depth and the number of denoising steps (ValueError)."""
        self.capture.validate(depth=config.depth, num_steps=num_steps)


@dataclasses.dataclass(frozen=True)
class StoreArgs:
    # Where the store goes: a directory, or s3://bucket/prefix or gs://bucket/prefix (the s3 / gcs extra; credentials
    # and endpoint from the standard environment variables, e.g. AWS_ENDPOINT_URL_S3).
    output_dir: str = "data/latents"
    # Continue a run in --output-dir: finished episodes are kept, an unfinished one is re-run.
    resume: bool = False
    # Take over the store's writer lock when the run that held it is no longer running (killed or crashed; checked
    # by host, pid and process start time). A live writer's lock is never broken.
    break_stale_lock: bool = False
    # Writer queue length (steps); inference waits on disk only when it is full.
    queue_size: int = 8

    def check_store(self) -> None:
        if self.queue_size < 1:
            raise ValueError(
                f"--queue-size must be >= 1 (steps waiting for the disk; default 8), got {self.queue_size}."
            )


def check_intervention(edit: iv.Intervention | None, config: Pi0Config, *, num_steps: int) -> None:
    """An intervention (None: none) against the model, as every recorded inference applies it (one observation)."""
    if edit is not None:
        edit.validate(config, num_steps=num_steps, batch=1)
