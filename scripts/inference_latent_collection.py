"""Run pi0 in LIBERO episodes (openpi's evaluation protocol) and record its latents at every inference.

Offline smoke run (tiny random-weight model, no download, a few minutes on 2 CPU cores):

    uv run python scripts/inference_latent_collection.py --preset pi0_libero_tiny --task-suite libero_goal \\
        --task-ids 0 --episodes-per-task 1 --max-steps 20 --output-dir data/smoke

The real job (openpi's released pi0_libero checkpoint; needs the `gcs` extra for gs://, or a local copy):

    uv run python scripts/inference_latent_collection.py --preset pi0_libero --task-suite libero_goal \\
        --episodes-per-task 10 --output-dir data/pi0_libero_goal
"""

import logging
import sys

import tyro

from openpi.latents import collect


def main(args: collect.CollectionArgs) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        outcomes = collect.collect(args)
    except collect.SetupError as e:
        # Bad input, found before any rollout: a clear message, no traceback, nothing written.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print()
    print(collect.summary_table(collect.make_plan(args), outcomes))
    print(f"\nLatents in {args.output_dir} ({args.output_format}). Open them with:")
    print("  import expert_data_utils")
    extra = ", allow_pickle=True" if args.output_format == "pickle" else ""  # only for pickles you trust
    print(f"  task_data = expert_data_utils.load_inference_task_data({str(args.output_dir)!r}, task_id=...{extra})")


if __name__ == "__main__":
    main(tyro.cli(collect.CollectionArgs, description=__doc__))
