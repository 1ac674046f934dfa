"""Builds a `PolicyServer` from `ServeArgs`: checks in order of cost, then the policy, then the store."""

from __future__ import annotations

import logging

from openpi.latents import store as _store
from openpi.latents.store import manifest as manifest_lib
from openpi.policies import policy_config
from openpi.serving.args import RESUME_IGNORE, ServeArgs, build_manifest, make_plan
from openpi.serving.engine import make_engine
from openpi.serving.recording import Recorder
from openpi.serving.server import PolicyServer

logger = logging.getLogger(__name__)


def create_server(args: ServeArgs, *, policy=None) -> PolicyServer:
    """Checks the arguments and the output store (writing nothing), loads the policy, opens the store.

    `policy`: serve this `Policy` instead of loading the preset's (it must sample `num_denoise_steps` steps).
    Raises ValueError / FileNotFoundError / FileExistsError / PermissionError naming the flag to fix.
    """
    plan = make_plan(args)
    run_manifest = build_manifest(plan)
    manifest = manifest_lib.complete_manifest(run_manifest)
    if args.record:
        _store.LatentStoreWriter.check_can_open(
            args.output_dir,
            manifest,
            resume=args.resume,
            resume_ignore=RESUME_IGNORE,
            break_stale_lock=args.break_stale_lock,
        )
    if policy is None:
        logger.info("Loading policy %s (%s)", plan.preset.name, plan.checkpoint or "preset default")
        policy = policy_config.create_trained_policy(
            plan.preset,
            plan.checkpoint,
            asset_id=args.asset_id,
            sample_kwargs={"num_steps": args.num_denoise_steps},
            rng_seed=plan.seed,
        )
    writer = None
    if args.record:
        writer = _store.LatentStoreWriter.create_or_open(
            args.output_dir,
            manifest,
            resume=args.resume,
            queue_size=args.queue_size,
            resume_ignore=RESUME_IGNORE,
            break_stale_lock=args.break_stale_lock,
        )
    config = policy.model.config
    recorder = Recorder(
        writer,
        seed=plan.seed,
        noise_shape=(config.action_horizon, config.action_dim),
        simulator=plan.simulator,
        store_images=args.store_images,
    )
    metadata = {
        **policy.metadata,
        "latent_recording": {
            "store": str(writer.root) if writer is not None else None,
            "record_fields": sorted(run_manifest.record_fields or {}),
            "connections_task_id": run_manifest.connections_task_id,
        },
    }
    prompt = {"as-sent": None, "blank": "", "text": args.prompt_text}[args.prompt]
    return PolicyServer(
        make_engine(
            policy, args.capture, plan.intervention, max_batch=args.max_batch, max_wait_s=args.batch_wait_ms / 1000
        ),
        recorder,
        metadata,
        host=args.host,
        port=args.port,
        api_key=args.resolved_api_key(),
        prompt=prompt,
        default_prompt=args.default_prompt,
    )
