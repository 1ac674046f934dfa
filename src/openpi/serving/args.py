"""The server's arguments, their checks (before anything is loaded) and the store manifest."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Literal

from openpi import envs
from openpi.envs import base as env_base
from openpi.latents.recording.args import STORE_RESUME_IGNORE, CaptureArgs, PolicyArgs, StoreArgs, check_intervention
from openpi.latents.store import manifest as manifest_lib
from openpi.models import intervention as iv
from openpi.models.intervention_file import load_intervention
from openpi.policies import batching, presets
from openpi.serving import protocol

API_KEY_ENV = "OPENPI_SERVER_API_KEY"
# Arguments a resumed store may change: they change how the server is reached, not what it records.
RESUME_IGNORE = (
    manifest_lib.DEFAULT_RESUME_IGNORE
    | STORE_RESUME_IGNORE
    | {f"arguments.{k}" for k in ("host", "port", "max_batch", "batch_wait_ms", "resume")}
)


DEFAULT_PRESET = "pi0_libero"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """openpi's `policy:checkpoint`: a trained checkpoint (--policy.config is a preset name here, e.g. pi0_libero)."""

    # The training config / preset name (openpi's --policy.config): pi0_libero, pi05_libero, pi0_libero_tiny, ...
    config: str
    # The checkpoint directory, local or gs:// (openpi's --policy.dir; this server's --checkpoint).
    dir: str | None = None


@dataclasses.dataclass(frozen=True)
class Default:
    """openpi's `policy:default`: the environment's default policy (here --preset, else pi0_libero)."""


@dataclasses.dataclass(frozen=True)
class ServeArgs(StoreArgs, CaptureArgs, PolicyArgs):
    """Serve pi0 on openpi's websocket protocol and record its latents at every inference.

    The policy, capture and store flags are the shared groups of `openpi.latents.recording.args` (the collection's);
    the server's own follow. openpi's spellings work too: `--env LIBERO`, `--default-prompt TEXT` and
    `policy:checkpoint --policy.config NAME --policy.dir DIR` (= --preset NAME --checkpoint DIR).
    """

    # Policy preset (as the collection's --preset): pi0_libero, pi05_libero, pi0_libero_tiny, ... Default:
    # policy:checkpoint's --policy.config, else pi0_libero.
    preset: str | None = None
    # The latent store (a directory, s3:// or gs://).
    output_dir: str = "data/served"
    # Interface to listen on (0.0.0.0: every interface; then set an API key).
    host: str = "127.0.0.1"
    # Port (openpi's default 8000; 0 picks a free one and prints it).
    port: int = 8000
    # Clients must send `Authorization: Api-Key <key>` (openpi_client's api_key=). Default: $OPENPI_SERVER_API_KEY;
    # none: every client is accepted.
    api_key: str | None = None
    # openpi's --env: the environment the clients run (LIBERO; case-insensitive). Must be the preset's simulator.
    env: str | None = None
    # openpi's --default-prompt: the prompt of a request that carries none (a request's own prompt wins).
    default_prompt: str | None = None
    # Noise seed: inference i of episode (task, k) uses draw i of numpy default_rng([seed, task, k]).
    # Default: the preset's simulator's seed (the collection's default).
    seed: int | None = None
    # An intervention applied at every inference: a JSON file (format: openpi.models.intervention_file).
    intervention: pathlib.Path | None = None
    # The prompt the model gets: "as-sent" (the request's), "blank" (empty) or "text" (--prompt-text). With a
    # replaced prompt the request's is stored as sent_prompt.
    prompt: Literal["as-sent", "blank", "text"] = "as-sent"
    prompt_text: str | None = None
    # Record into --output-dir (--no-record: serve only).
    record: bool = True
    # Requests waiting at the same time run as one batched call of at most this many (1, 2, 4, 8, ...; 1: one at a
    # time, bit-exact; with --intervention always one at a time). Batches change float rounding slightly.
    max_batch: int = 8
    # How long the first waiting request waits for others to join its batch (milliseconds).
    batch_wait_ms: float = 2.0
    # Persistent JAX compilation cache directory (default: $JAX_COMPILATION_CACHE_DIR; neither: compile every run). A
    # second run of the same model loads the compiled programs instead (tiny preset, 2 CPU cores: ~16 s -> ~3 s).
    jax_cache_dir: str | None = None

    # openpi's policy choice: `policy:checkpoint --policy.config NAME --policy.dir DIR`, or `policy:default`.
    policy: Checkpoint | Default = Default()

    def resolved_api_key(self) -> str | None:
        return self.api_key if self.api_key is not None else (os.environ.get(API_KEY_ENV) or None)


def resolve_policy(args: ServeArgs) -> tuple[str, str | None]:
    """(preset name, checkpoint) from this server's flags and openpi's; ValueError when they disagree."""
    preset, checkpoint = args.preset, args.checkpoint
    if isinstance(args.policy, Checkpoint):
        if preset is not None and preset != args.policy.config:
            raise ValueError(
                f"--preset {preset} and policy:checkpoint --policy.config {args.policy.config} disagree; give one."
            )
        if checkpoint is not None and args.policy.dir is not None and checkpoint != args.policy.dir:
            raise ValueError(f"--checkpoint {checkpoint} and --policy.dir {args.policy.dir} disagree; give one.")
        preset, checkpoint = args.policy.config, checkpoint or args.policy.dir
    return preset or DEFAULT_PRESET, checkpoint


@dataclasses.dataclass(frozen=True)
class ServePlan:
    args: ServeArgs
    preset: presets.PolicyPreset
    checkpoint: str | None
    simulator: env_base.Simulator
    seed: int
    intervention: iv.Intervention | None


def make_plan(args: ServeArgs) -> ServePlan:
    """Checks everything that needs neither the model nor the store; ValueError / FileNotFoundError name the fix."""
    preset_name, checkpoint = resolve_policy(args)
    preset = args.check_policy(preset_name)
    args.check_store()
    sim = envs.get(preset.env)
    if args.env is not None and args.env.lower() != sim.name:
        raise ValueError(
            f"--env {args.env}: this server runs the {sim.name} environment of preset {preset.name} "
            f"(openpi's --env {sim.name.upper()}); other environments (ALOHA, DROID) are not served here."
        )
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in 0..65535, got {args.port}.")
    if args.max_batch not in batching.DEFAULT_BUCKETS or args.batch_wait_ms < 0:
        raise ValueError(f"--max-batch must be one of {batching.DEFAULT_BUCKETS} and --batch-wait-ms >= 0.")
    if (args.prompt == "text") != (args.prompt_text is not None):
        raise ValueError("--prompt text needs --prompt-text TEXT, and --prompt-text needs --prompt text.")
    config = preset.model_config
    args.check_capture(config, args.num_denoise_steps)
    intervention = None if args.intervention is None else load_intervention(args.intervention)
    check_intervention(intervention, config, num_steps=args.num_denoise_steps)
    seed = sim.default_seed if args.seed is None else args.seed
    return ServePlan(args, preset, checkpoint, sim, seed, intervention)


def build_manifest(plan: ServePlan) -> manifest_lib.RunManifest:
    """The store manifest (the collection's keys, so the analysis reads a served store the same way)."""
    args, preset = plan.args, plan.preset
    arguments = dataclasses.asdict(args)
    arguments.pop("api_key")  # never stored
    arguments["intervention"] = None if args.intervention is None else str(args.intervention)
    arguments["output_dir"] = str(args.output_dir)
    arguments["seed"] = plan.seed
    return manifest_lib.RunManifest(
        kind="pi0 latent policy server",
        arguments=arguments,
        capture_spec=args.capture.to_dict(),
        checkpoint=plan.checkpoint or preset.default_checkpoint or f"random(seed={preset.param_seed})",
        preset=preset.name,
        model_config=preset.model_config.describe(),
        intervention=iv.describe(plan.intervention),
        record_fields=dict(protocol.RECORD_FIELDS),
        connections_task_id=protocol.CONNECTIONS_TASK_ID,
        **preset.model_config.layout.manifest_fields(),  # text_start, segment_names, suffix_segment_names
    )
