"""Language-loss report of a latent collection: metrics.json, CSV tables, PNG plots and report.md.

    uv run python scripts/expert_language_analysis.py --collection data/pi0_libero_goal --output-dir reports/goal

Every registered metric (`openpi.latents.analysis.registry`) is computed per layer and stream (text_only / expert_0 /
expert_1), reading one layer at a time. The token embedding and final norm for text decoding are read (those two
leaves only) from the checkpoint recorded in the collection's manifest. Definitions: `openpi.latents.analysis.metrics`,
`openpi.latents.analysis.registry` and `openpi.latents.analysis.language_loss`.

With `--conditions DIR` (a directory of condition stores, e.g. a layer sweep) report.md gains the section
"Behaviour under conditions" (`openpi.latents.analysis.behaviour`): success per condition and task against the paired
baseline, McNemar's exact test, a bootstrap over tasks, action divergence and the first divergent step.

The original notebook API's entry points are kept here (they delegate to the package):

    analyze_inference_language_loss(task_data)  # per-layer expert_0 / expert_1 / text_only language loss + overall
    analyze_rollout_step(step_data)             # the same for one rollout step
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from typing import Literal

import tyro

from openpi.latents import analysis, report
from openpi.latents.analysis.language_loss import analyze_inference_language_loss, analyze_rollout_step
from openpi.latents.store.location import ObjectStoreError
from openpi.shared import cli

__all__ = ["Args", "analyze_inference_language_loss", "analyze_rollout_step", "main"]


@dataclasses.dataclass(frozen=True)
class Args:
    """Turn a latent collection into a language-loss report folder."""

    # The collection: a latent store (a directory, s3://bucket/prefix or gs://bucket/prefix), or a pickle
    # directory/file with --allow-pickle.
    collection: str
    # Where metrics.json, the CSV tables, the PNG plots and report.md go.
    output_dir: pathlib.Path = pathlib.Path("reports/language_loss")
    # Only these task ids (default: all).
    task_ids: tuple[int, ...] = ()
    # Checkpoint (local dir or gs://) to read the token embedding / final norm from, instead of the manifest's.
    checkpoint: str | None = None
    # Text reconstruction and the logit lens (--no-text-decoding skips them and reads no embedding).
    text_decoding: bool = True
    # Decode text at every k-th rollout step only (text decoding dominates the cost at full size).
    text_step_stride: int = 1
    # Task-probe cross-validation folds (grouped by episode).
    probe_splits: int = 5
    # Shuffled-label permutations of the task-probe control (0 skips the control).
    probe_shuffles: int = 10
    # Bootstrap resamples for every confidence interval.
    n_boot: int = 1000
    # Seed of everything random (bootstrap, probe folds, permutations).
    seed: int = 0
    # Read at most this many MiB of one layer per block (bounds memory).
    max_block_mib: int = 64
    # Open pickles (unpickling executes code from the file: only for files you trust).
    allow_pickle: bool = False
    # How episodes of different lengths are aligned for success vs failure: "progress" (default: bins of normalised
    # progress through each episode, which never collapse), "common" (the first N rollout steps, N = fewest any
    # episode has) or "all" (each episode's own steps: failed episodes run longer, so step-dependent metrics are
    # confounded).
    success_window: Literal["progress", "common", "all"] = "progress"
    # Analyse a damaged store's intact episodes (by default a damaged store is refused, listing the damage).
    skip_damaged: bool = False
    # Closed-loop conditions to compare with their paired baseline (a directory of condition stores, as a sweep or
    # --condition.baseline writes): adds the "Behaviour under conditions" section to report.md.
    conditions: pathlib.Path | None = None
    # The baseline store of --conditions (default: the one among them with the task prompt and no intervention).
    baseline: pathlib.Path | None = None
    # Pooled metrics (token-identity probe, tuned lens, CKA, effective rank) on a sample of every episode's steps.
    pooled: bool = True
    # Held-out unit of the token probe and the tuned lens: "task" (prompts never seen in training) or "episode".
    pooled_split: Literal["task", "episode"] = "task"
    # Evenly spaced rollout steps per episode in the pooled sample.
    pooled_steps_per_episode: int = 2
    # A control collection analysed the same way and shown beside this one (dashed in every per-layer figure, its
    # values in metrics.json and each figure's statistics line): the matched one is this collection's observations
    # re-run with a random-initialised model of the same config, or a second checkpoint (scripts/replay_collection.py).
    control: pathlib.Path | None = None
    # The control's name in the report (default: its manifest's checkpoint).
    control_label: str | None = None


def main(args: Args) -> dict:
    cli.configure_logging()
    embedding: object = "auto"
    if not args.text_decoding:
        embedding = None
    elif args.checkpoint:
        from openpi.latents.analysis.embedding import read_checkpoint_leaves

        embedding = read_checkpoint_leaves(args.checkpoint)
    t0 = time.monotonic()
    res = analysis.analyze_collection(
        args.collection,
        embedding=embedding,
        task_ids=list(args.task_ids) or None,
        probe_splits=args.probe_splits,
        probe_shuffles=args.probe_shuffles,
        n_boot=args.n_boot,
        seed=args.seed,
        text_step_stride=args.text_step_stride,
        max_block_bytes=args.max_block_mib << 20,
        allow_pickle=args.allow_pickle,
        success_window=args.success_window,
        skip_damaged=args.skip_damaged,
        pooled=args.pooled,
        pooled_split=args.pooled_split,
        pooled_steps_per_episode=args.pooled_steps_per_episode,
        control=args.control,
        control_label=args.control_label,
        progress=lambda msg: print(msg, flush=True),
    )
    behaviour = None
    if args.conditions is not None:
        from openpi.latents.analysis.behaviour import analyze_conditions

        behaviour = analyze_conditions(args.conditions, baseline=args.baseline, n_boot=args.n_boot, seed=args.seed)
    data = report.write_report(res, args.output_dir, behaviour=behaviour)
    print(f"Report in {args.output_dir}/report.md ({time.monotonic() - t0:.1f}s)")
    for line in report.readings(res).values():
        print("  " + line)
    return data


if __name__ == "__main__":
    try:
        main(tyro.cli(Args, description=__doc__))
    except (ValueError, FileNotFoundError, PermissionError, KeyError, ObjectStoreError) as e:
        print(f"error: {cli.cli_message(str(e), {'allow_pickle': '--allow-pickle'})}", file=sys.stderr)
        raise SystemExit(2) from None
