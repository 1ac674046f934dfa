"""The policy of a collection run (one home: the one-machine run and each Ray policy worker load the same)."""

from __future__ import annotations

import logging

from openpi.latents.collect.args import Plan
from openpi.policies import policy_config
from openpi.policies.policy import Policy

logger = logging.getLogger(__name__)


def load_policy(plan: Plan) -> Policy:
    """The policy of the run's preset / checkpoint, sampling ``--num-denoise-steps`` steps."""
    args = plan.args
    logger.info("Loading policy %s (%s)", plan.preset.name, args.checkpoint or "preset default")
    return policy_config.create_trained_policy(
        plan.preset,
        args.checkpoint,
        asset_id=args.asset_id,
        sample_kwargs={"num_steps": args.num_denoise_steps},
        rng_seed=args.seed,
    )
