"""Make the matched control collection of a latent store: its observations re-run through another model.

Default: a random-initialised model of the source's config (params from --init-seed), fed the source's stored images,
state, prompt and noise (and its counterfactual prompts) at every rollout step; the output is a latent store with the
same tasks, episodes, rollout steps and capture spec, whose manifest says what it is a control of
(`openpi.latents.replay`). Then analyse the source with it as the control:

    uv run python scripts/replay_collection.py --source data/pi0_libero_goal --output-dir data/pi0_libero_goal_random
    uv run python scripts/expert_language_analysis.py --collection data/pi0_libero_goal \\
        --control data/pi0_libero_goal_random --control-label "random init" --output-dir reports/goal

A second checkpoint of the same config instead: `--checkpoint /path/to/ckpt` (`--asset-id` for its norm stats).
The source must have been collected with images stored (the default; not with --no-store-images).
Ctrl-C stops after the rollout step in flight; rerun with --resume to continue.
"""

import sys

import tyro

from openpi.latents import replay as replay_lib
from openpi.latents.recording.interrupt import Interrupted, StopOnSignal
from openpi.latents.store import StoreLockedError
from openpi.latents.store.location import ObjectStoreError
from openpi.shared import cli, jax_cache

# Bad input found before the model loads (OSError covers a missing path, an existing output, permissions, a full disk).
SETUP_ERRORS = (ValueError, OSError, ImportError, ObjectStoreError, StoreLockedError)


def main(args: replay_lib.ReplayArgs) -> replay_lib.ReplaySummary:
    cli.configure_logging()
    try:
        jax_cache.configure(args.jax_cache_dir)
        plan = replay_lib.make_plan(args)
        replay_lib.check_output(plan)
    except SETUP_ERRORS as e:  # bad input, found before the model loads: a message naming the fix, nothing written
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(
        f"Replaying {len(plan.episodes)} episodes of {args.source} through {plan.manifest.checkpoint} "
        f"({plan.num_steps} denoising steps) into {args.output_dir}",
        flush=True,
    )
    try:
        with StopOnSignal() as stop:
            summary = replay_lib.replay(args, stop=stop)
    except Interrupted as e:
        print(f"\nStopped by {e.signal_name}; finished episodes are kept. Continue with --resume.", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    print(
        f"Control store {summary.output_dir}: {len(summary.replayed)} episodes replayed ({summary.steps} rollout "
        f"steps), {len(summary.kept)} kept from before."
    )
    return summary


if __name__ == "__main__":
    main(tyro.cli(replay_lib.ReplayArgs, description=__doc__))
