"""Run pi0 in LIBERO episodes (openpi's evaluation protocol) and record its latents at every inference.

Offline smoke run (tiny random-weight model, no download, a few minutes on 2 CPU cores):

    uv run python scripts/inference_latent_collection.py --preset pi0_libero_tiny --task-suite libero_goal \\
        --task-ids 0 --episodes-per-task 1 --max-steps 20 --output-dir data/smoke

The real job (openpi's released pi0_libero checkpoint; needs the `gcs` extra for gs://, or a local copy):

    uv run python scripts/inference_latent_collection.py --preset pi0_libero --task-suite libero_goal \\
        --episodes-per-task 10 --output-dir data/pi0_libero_goal

Closed-loop conditions (each recorded in the manifest and every episode; paired with the baseline by task, initial
state, seed and inference index): `--condition.prompt blank|other-task|text`, `--condition.intervention
knockout-language|knockout-text-keys|knockout-text-direct|ablate-text|steer|file.json` (old names knockout-text,
knockout-text-expert1 kept as aliases), `--condition.sweep-layers` (one store per layer
under --output-dir), `--condition.text-latent latents.npz --condition.text-latent-task K`. LIBERO-PRO suites:
`--task-suite libero_goal_task` etc. (prompted with the BDDL's perturbed instruction).

`--output-dir s3://bucket/prefix` (the `s3` extra) or `gs://bucket/prefix` (the `gcs` extra) writes the store to object
storage; credentials and endpoint come from the standard environment variables (README, "On object storage").

Ctrl-C (or SIGTERM) stops after the inference in flight and prints the command that resumes the run.
"""

import shlex
import sys
from collections.abc import Sequence

import tyro

from openpi.latents import collect
from openpi.latents.collect.parallel import WorkerDied
from openpi.shared import cli, jax_cache


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues the run `argv` started (the same arguments with --resume)."""
    kept = [a for a in argv[1:] if a not in ("--resume", "--no-resume")]
    return shlex.join([sys.executable, argv[0], *kept, "--resume"])


def main(args: collect.CollectionArgs, argv: Sequence[str] | None = None) -> None:
    """Runs the collection; `argv` (default `sys.argv`) is the command line, repeated in the hint to resume."""
    cli.configure_logging()
    try:
        jax_cache.configure(args.jax_cache_dir)
        with collect.StopOnSignal() as stop:
            runs = collect.collect_conditions(args, stop=stop)
    except (collect.SetupError, jax_cache.CacheDirError) as e:
        # Bad input, found before any rollout: a clear message, no traceback, nothing written.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except collect.Interrupted as e:
        print(
            f"\nStopped by {e.signal_name}. Finished episodes are kept in {args.output_dir}; an unfinished one is run "
            f"again from its start on resume. Resume with:\n  {resume_command(sys.argv if argv is None else argv)}",
            file=sys.stderr,
        )
        raise SystemExit(e.exit_code) from None
    except WorkerDied as e:  # an env worker killed or crashed: the store is as after a crash, resumable
        print(
            f"\nerror: {e}\nFinished episodes are kept in {args.output_dir}. Resume with:\n  "
            f"{resume_command(sys.argv if argv is None else argv)}",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    for run in runs:
        print(f"\ncondition {run.name}:" if len(runs) > 1 else "")
        print(collect.summary_table(run.plan, run.outcomes))
    print(f"\nLatents in {args.output_dir} ({args.output_format}). Open them with:")
    print("  import expert_data_utils")
    extra = ", allow_pickle=True" if args.output_format == "pickle" else ""  # only for pickles you trust
    print(f"  task_data = expert_data_utils.load_inference_task_data({str(args.output_dir)!r}, task_id=...{extra})")


if __name__ == "__main__":
    main(tyro.cli(collect.CollectionArgs, description=__doc__), sys.argv)
