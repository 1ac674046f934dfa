"""The collection run: setup checks in order, then every planned episode of every task, then the summary.

On top of openpi's evaluation protocol (`openpi.envs.base.run_episode`) every inference calls
`Policy.infer_with_latents` and streams one record per rollout step to the output. Every check that can fail on bad
input runs before the model is loaded or an env is created. An episode has had exactly as many env resets before it
as in an uninterrupted run (LIBERO re-places the fixtures at every reset, see `Env.replay_resets`), so a resumed
run records the same episodes.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import sys

import tqdm

from openpi.envs import base as env_base
from openpi.latents.collect.args import (
    CLI_FLAGS,
    SETUP_ERRORS,
    CollectionArgs,
    Plan,
    SetupError,
    make_plan,
)
from openpi.latents.collect.episode import episode_attrs, finish_metadata, run_task_episode
from openpi.latents.collect.malloc import limit_malloc_arenas
from openpi.latents.collect.outputs import EpisodeOutcome, Output, check_output, open_output, task_dict
from openpi.latents.collect.parallel import run_parallel
from openpi.latents.collect.policy import load_policy
from openpi.latents.collect.sizes import estimate_size
from openpi.latents.recording.disk import free_space_warning
from openpi.latents.recording.interrupt import StopOnSignal
from openpi.latents.store import location
from openpi.latents.store import manifest as manifest_lib
from openpi.policies.policy import Policy
from openpi.shared.cli import cli_message

logger = logging.getLogger(__name__)


def build_manifest(plan: Plan) -> manifest_lib.RunManifest:
    """The run manifest (before `manifest_lib.complete_manifest` adds the code version and content hash)."""
    args, preset = plan.args, plan.preset
    return manifest_lib.RunManifest(
        kind="pi0 LIBERO latent collection",
        arguments=dataclasses.asdict(args),
        capture_spec=args.capture.to_dict(),
        checkpoint=args.checkpoint or preset.default_checkpoint or f"random(seed={preset.param_seed})",
        preset=preset.name,
        model_config=preset.model_config.describe(),
        suite=plan.tasks[0].suite,
        max_steps=plan.max_steps,
        **preset.model_config.layout.manifest_fields(),  # text_start, segment_names, suffix_segment_names
        condition=plan.condition.describe(),
    )


def _setup(args: CollectionArgs, policy: Policy | None) -> tuple[Plan, Policy, Output]:
    """Every check, in order of cost (arguments, output directory, checkpoint), then the policy and the output."""
    plan = make_plan(args)
    plan.simulator.configure()
    manifest = manifest_lib.complete_manifest(build_manifest(plan))
    check_output(plan, manifest)
    if args.backend == "ray":
        from openpi.latents.collect import ray_backend  # Ray is an optional extra

        ray_backend.check_ray(args)
    if policy is None:
        policy = load_policy(plan)
    return plan, policy, open_output(plan.args, manifest)


def collect(
    args: CollectionArgs, *, policy: Policy | None = None, stop: StopOnSignal | None = None
) -> list[EpisodeOutcome]:
    """Runs the collection; returns one outcome per planned episode (including ones kept from a resumed run).

    Every check that can fail on bad input (arguments, capture spec, output directory, checkpoint and norm stats)
    runs before any env is created, in that order, and raises `SetupError`; the output is only written once all of
    them passed. `policy`: use this policy instead of loading the preset's (it must sample `num_denoise_steps` steps).
    With ``--backend ray`` each policy worker loads the preset's policy itself (`policy` here only serves the size
    estimate); a stop signal kills the workers within a second, leaving the store resumable as after a crash.
    `stop`: an active `StopOnSignal`; a signal during the rollouts then stops the run after the inference in flight
    (`Interrupted` is raised once the output is closed). Caps glibc's malloc arenas for the rest of the process (see
    `limit_malloc_arenas`).
    """
    limit_malloc_arenas()
    try:
        plan, policy, output = _setup(args, policy)
    except SETUP_ERRORS as e:
        raise SetupError(cli_message(str(e), CLI_FLAGS)) from e
    try:
        estimate = estimate_size(plan, policy)
        print(estimate.describe(), flush=True)
        remote = location.is_remote(location.as_path(args.output_dir))
        warning = None if remote else free_space_warning(pathlib.Path(args.output_dir), estimate.total)
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        return _run(plan, policy, output, stop or StopOnSignal())
    finally:
        output.close()


class _Progress:
    """The episode bar with the running success rate, and one log line per finished episode."""

    def __init__(self, total: int, kept: list[EpisodeOutcome]):
        self.outcomes = list(kept)
        self.bar = tqdm.tqdm(total=total, desc="episodes", unit="ep", dynamic_ncols=True)

    def done(self, outcome: EpisodeOutcome) -> None:
        self.outcomes.append(outcome)
        successes = sum(o.success for o in self.outcomes)
        n = len(self.outcomes)
        self.bar.update(1)
        self.bar.set_postfix(task=outcome.task_id, success=f"{successes}/{n} ({successes / n:.0%})")
        logger.info(
            "task %d episode %d: %s after %d steps%s",
            outcome.task_id,
            outcome.episode_index,
            "success" if outcome.success else "failure",
            outcome.total_steps,
            f" (error: {outcome.error})" if outcome.error else "",
        )

    def close(self) -> None:
        self.bar.close()


def _run(plan: Plan, policy: Policy, output: Output, stop: StopOnSignal) -> list[EpisodeOutcome]:
    kept: list[EpisodeOutcome] = []
    todo: dict[int, list[int]] = {}
    for task in plan.tasks:
        done = output.completed(task_dict(task))
        kept += [output.previous_outcome(task.task_id, k) for k in plan.episodes if k in done]
        todo[task.task_id] = [k for k in plan.episodes if k not in done]
    n_todo = sum(len(v) for v in todo.values())
    if kept:
        print(f"Resuming: {len(kept)} episodes already complete, {n_todo} to run.", flush=True)
    progress = _Progress(n_todo, kept)
    stop.deferring = True  # a signal now stops the run at the next inference, not in the middle of one
    try:
        if plan.args.backend == "ray":
            from openpi.latents.collect import ray_backend  # Ray is an optional extra

            ray_backend.run_on_ray(plan, output, todo, progress.done, stop)
        elif plan.args.num_envs > 1:
            run_parallel(plan, policy, output, todo, stop, progress.done)
        else:
            for task in plan.tasks:
                if todo[task.task_id]:
                    _run_task(plan, policy, output, task, todo[task.task_id], progress, stop)
    finally:
        stop.deferring = False
        progress.close()
    return progress.outcomes


def _run_task(
    plan: Plan,
    policy: Policy,
    output: Output,
    task: env_base.TaskInfo,
    episodes: list[int],
    progress: _Progress,
    stop: StopOnSignal,
) -> None:
    """`episodes` of `task` in one env (an env per task: closing one does not give its memory back)."""
    with plan.simulator.make_env(task, plan.args.seed) as env:
        for k in episodes:
            stop.check()
            if env.num_resets < k:  # --resume skipped episodes: give episode k the scene of an uninterrupted run
                logger.info("Replaying %d env resets for episode %d.", k - env.num_resets, k)
                env.replay_resets(k)
            progress.done(_run_episode(plan, policy, output, env, k, stop))


def _run_episode(
    plan: Plan, policy: Policy, output: Output, env: env_base.Env, k: int, stop: StopOnSignal
) -> EpisodeOutcome:
    task, args = env.task, plan.args
    writer = output.begin(task_dict(task), k, episode_attrs(plan, task, k))
    result = run_task_episode(plan, policy, env, writer, k, check_stop=stop.check)
    writer.finish(finish_metadata(result))
    if args.save_videos and result.frames:
        name = f"task{task.task_id:03d}_ep{k:03d}_{'success' if result.success else 'failure'}.mp4"
        env_base.save_video(result.frames, pathlib.Path(args.output_dir) / "videos" / name)  # local only
    return EpisodeOutcome(task.task_id, k, result.success, result.total_steps, result.error)


def summary_table(plan: Plan, outcomes: list[EpisodeOutcome]) -> str:
    """Success per task in openpi's terms (# episodes, # successes, success rate), then the total."""
    lines = [f"{'task':>4}  {'instruction':50s} {'episodes':>8} {'successes':>9} {'rate':>7} {'errors':>6}"]
    for task in plan.tasks:
        rows = [o for o in outcomes if o.task_id == task.task_id]
        n, s = len(rows), sum(o.success for o in rows)
        errors = sum(o.error is not None for o in rows)
        rate = f"{s / n:.1%}" if n else "-"
        lines.append(f"{task.task_id:>4}  {task.language[:50]:50s} {n:>8} {s:>9} {rate:>7} {errors:>6}")
    n, s = len(outcomes), sum(o.success for o in outcomes)
    lines.append(f"{'':>4}  {'Total success rate':50s} {n:>8} {s:>9} {(f'{s / n:.1%}' if n else '-'):>7}")
    return "\n".join(lines)
