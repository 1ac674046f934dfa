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

`--capture seed` records what the seed plan's notebooks read (full expert-0 and expert-1 streams, every layer and
denoising step, and the text window: 82.5 MB per inference for the full-size model in bf16; open with
`expert_data_utils.load_seed_task_data`); `--capture everything` / `off` are the other named specs.

`--list-tasks [--task-suite NAME]` prints the suites (or a suite's task ids, names and instructions) and exits.
openpi's LIBERO example spellings `--task-suite-name` / `--num-trials-per-task` are answered with this script's.
"""

import shlex
import sys
from collections.abc import Sequence

import tyro

from openpi.latents import collect
from openpi.latents.collect import args as args_lib
from openpi.latents.collect.parallel import WorkerDied
from openpi.models.capture import split_capture_preset
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


def early_exit(argv: Sequence[str]) -> int | None:
    """Handles what exits before the arguments are parsed: openpi's flag spellings (hints, exit 2) and
    --list-tasks (exit 0). None: run normally."""
    errors = args_lib.openpi_flag_errors(argv)
    if errors:
        print("error: " + " ".join(errors), file=sys.stderr)
        return 2
    if "--list-tasks" not in argv:
        return None
    suite = next((a.split("=", 1)[1] for a in argv if a.startswith("--task-suite=")), None)
    if "--task-suite" in argv and argv.index("--task-suite") + 1 < len(argv):
        suite = argv[argv.index("--task-suite") + 1]
    preset = args_lib.DEFAULT_PRESET
    if "--preset" in argv and argv.index("--preset") + 1 < len(argv):
        preset = argv[argv.index("--preset") + 1]
    try:
        print(args_lib.describe_tasks(suite, preset))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = early_exit(sys.argv[1:])
    if code is not None:
        raise SystemExit(code)
    try:
        capture, rest = split_capture_preset(sys.argv[1:])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    default = None if capture is None else collect.CollectionArgs(capture=capture)
    main(tyro.cli(collect.CollectionArgs, args=rest, default=default, description=__doc__), sys.argv)
