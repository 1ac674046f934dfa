"""LIBERO rollouts with pi0 that record the model's latents at every inference (the main job).

The protocol is openpi's LIBERO evaluation (`openpi.envs.libero.run_episode`); on top of it every inference calls
`Policy.infer_with_latents` and streams one record per rollout step to the latent store (or the seed's pickle
layout). Everything that can be checked cheaply is checked before the model is loaded or an env is created.

An episode is the same whether it runs in one go, after a resume, or in a run with counterfactual reruns: its noise is
drawn from `seed`, `task_id` and the episode index, and its env has had exactly as many resets before it as in an
uninterrupted run (LIBERO re-places the fixtures at every reset, see `LiberoEnv.replay_resets`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import os
import pathlib
import sys
from collections.abc import Iterator
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from openpi.envs import libero
from openpi.latents import schema
from openpi.latents import store as _store
from openpi.latents.store import manifest as manifest_lib
from openpi.latents.store import pickle_format
from openpi.models import model as _model
from openpi.models.capture import CaptureSpec
from openpi.policies import policy_config
from openpi.policies.policy import Policy

logger = logging.getLogger(__name__)


class SetupError(ValueError):
    """The run cannot start: a bad argument, a missing checkpoint or norm stats, or an unusable output directory.

    Raised by `collect` before any env is created or anything is written; the message says what to fix (the original
    exception is the ``__cause__``). Errors during the rollouts are not wrapped.
    """


# What the setup phase raises for bad input (wrapped in SetupError by `collect`).
_SETUP_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, ImportError)
# Arguments a resumed run may change: they add or show work but do not change what an episode records.
RESUME_IGNORE = manifest_lib.DEFAULT_RESUME_IGNORE | {
    "arguments.task_ids",
    "arguments.episodes_per_task",
    "arguments.save_videos",
    "arguments.queue_size",
}


@dataclasses.dataclass(frozen=True)
class CollectionArgs:
    """Run pi0 in LIBERO episodes and record its latents at every inference."""

    # Policy preset: "pi0_libero" / "pi05_libero" (the released full-size checkpoints) or "pi0_libero_tiny" /
    # "pi05_libero_tiny" (random weights, no download; for smoke tests).
    preset: str = "pi0_libero"
    # Checkpoint directory (local or gs://). Default: the preset's (pi0_libero: gs://openpi-assets/checkpoints/pi0_libero).
    checkpoint: str | None = None
    # Norm-stats asset id inside <checkpoint>/assets (default: the preset's, "physical-intelligence/libero").
    asset_id: str | None = None
    # LIBERO suite: libero_spatial, libero_object, libero_goal, libero_10 or libero_90.
    task_suite: str = "libero_goal"
    # Task ids to run (default: every task of the suite).
    task_ids: tuple[int, ...] = ()
    # Episodes per task; episode k starts from the suite's initial state k (openpi uses 50).
    episodes_per_task: int = 10
    # Env steps per episode after the wait steps (default: openpi's per-suite value, e.g. 300 for libero_goal).
    max_steps: int | None = None
    # Actions executed from each predicted chunk before the next inference.
    replan_steps: int = 5
    # No-op steps after each reset while objects settle (not counted in t).
    num_steps_wait: int = libero.NUM_STEPS_WAIT
    # env.seed(...) and the noise seed.
    seed: int = libero.DEFAULT_SEED
    # Flow-matching (Euler) steps per inference.
    num_denoise_steps: int = 10
    # What to record at each inference.
    capture: CaptureSpec = CaptureSpec()
    # Where the store (or the pickle files) go.
    output_dir: pathlib.Path = pathlib.Path("data/latents")
    # "zarr": the streaming latent store; "pickle": the seed's inference_latents/task_{id}_{name}.pkl (whole task in
    # RAM; small captures only).
    output_format: Literal["zarr", "pickle"] = "zarr"
    # Continue a run in output_dir: finished episodes are kept, an unfinished one is re-run.
    resume: bool = False
    # Save an MP4 of the agent view per episode under <output_dir>/videos.
    save_videos: bool = False
    # Re-run inferences with a counterfactual prompt (same observation and noise): "blank" (empty prompt) or
    # "other-task" (the next task's instruction in the suite). Stored under cf_* keys.
    counterfactual: Literal["none", "blank", "other-task"] = "none"
    # Counterfactual rerun at every k-th inference of an episode.
    counterfactual_every: int = 1
    # Keep the preprocessed 224x224 images in each step record.
    store_images: bool = True
    # Writer queue length (steps); inference waits on disk only when it is full.
    queue_size: int = 8


@dataclasses.dataclass(frozen=True)
class EpisodeOutcome:
    task_id: int
    episode_index: int
    success: bool
    total_steps: int
    error: str | None
    skipped: bool = False  # already complete in the output (resume)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run will do, checked before anything expensive starts."""

    tasks: tuple[libero.TaskInfo, ...]
    episodes: tuple[int, ...]
    max_steps: int
    preset: policy_config.PolicyPreset

    @property
    def inferences_per_episode(self) -> int:
        return math.ceil(self.max_steps / self.replan_steps)

    replan_steps: int = 5


def make_plan(args: CollectionArgs) -> Plan:
    """Validates the arguments that need neither the model nor an env; raises ValueError naming the fix."""
    suite = libero.validate_suite(args.task_suite)
    all_tasks = libero.list_tasks(suite)
    ids = args.task_ids or tuple(range(len(all_tasks)))
    tasks = tuple(libero.get_task(suite, i) for i in ids)
    if len(set(ids)) != len(ids):
        raise ValueError(f"--task-ids lists a task twice: {list(ids)}.")
    if args.episodes_per_task < 1:
        raise ValueError(f"--episodes-per-task must be >= 1, got {args.episodes_per_task}.")
    for task in tasks:
        if args.episodes_per_task > task.num_init_states:
            raise ValueError(
                f"--episodes-per-task {args.episodes_per_task} exceeds the {task.num_init_states} initial states of "
                f"{suite} task {task.task_id}: episode k starts from initial state k (valid 1..{task.num_init_states})."
            )
    if args.replan_steps < 1 or args.num_steps_wait < 0 or args.counterfactual_every < 1:
        raise ValueError("--replan-steps and --counterfactual-every must be >= 1 and --num-steps-wait >= 0.")
    max_steps = libero.MAX_STEPS[suite] if args.max_steps is None else args.max_steps
    if max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {max_steps}.")
    if args.counterfactual == "other-task" and len(all_tasks) < 2:
        raise ValueError(f"--counterfactual other-task needs a suite with two tasks or more; {suite} has one.")
    preset = policy_config.get_preset(args.preset)
    config = preset.model_config
    args.capture.validate(depth=config.depth, num_steps=args.num_denoise_steps)
    if args.replan_steps > config.action_horizon:
        raise ValueError(
            f"--replan-steps {args.replan_steps} exceeds the model's action horizon {config.action_horizon}."
        )
    return Plan(tasks, tuple(range(args.episodes_per_task)), max_steps, preset, args.replan_steps)


def counterfactual_prompt(args: CollectionArgs, task: libero.TaskInfo) -> str | None:
    if args.counterfactual == "none":
        return None
    if args.counterfactual == "blank":
        return ""
    tasks = libero.list_tasks(task.suite)
    return tasks[(task.task_id + 1) % len(tasks)].language


# ------------------------------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------------------------------


def latent_shapes(policy: Policy, capture: CaptureSpec, num_steps: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of what `infer_with_latents` returns for one observation (no computation)."""
    config = policy.model.config
    h, w = _model.IMAGE_RESOLUTION
    obs = _model.Observation(
        images={k: jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32) for k in _model.IMAGE_KEYS},
        image_masks={k: jax.ShapeDtypeStruct((1,), jnp.bool_) for k in _model.IMAGE_KEYS},
        state=jax.ShapeDtypeStruct((1, config.action_dim), jnp.float32),
        tokenized_prompt=jax.ShapeDtypeStruct((1, config.max_token_len), jnp.int32),
        tokenized_prompt_mask=jax.ShapeDtypeStruct((1, config.max_token_len), jnp.bool_),
    )
    out = jax.eval_shape(
        lambda m, o: m.infer_with_latents(jax.random.key(0), o, num_steps=num_steps, capture=capture),
        policy.model,
        obs,
    )
    return {k: v for k, v in out.items() if v is not None}


def describe_capture(args: CollectionArgs, plan: Plan, policy: Policy) -> str:
    """What will be captured, and the estimated bytes per inference / episode / run (uncompressed)."""
    shapes = latent_shapes(policy, args.capture, args.num_denoise_steps)
    shapes.pop("actions", None)
    lines = ["Capture per inference:"]
    for key, s in sorted(shapes.items()):
        nbytes = schema.nbytes(s.shape, s.dtype)
        lines.append(f"  {key:26s} {list(s.shape)!s:28s} {np.dtype(s.dtype).name:9s} {schema.format_bytes(nbytes)}")
    config = policy.model.config
    extra = config.action_horizon * (7 + 2 * config.action_dim) * 4  # actions, model actions, noise
    if args.store_images:
        extra += 2 * 224 * 224 * 3
    per_inference = schema.estimate_bytes(shapes) + extra
    if args.counterfactual != "none":
        per_inference += schema.estimate_bytes(shapes) // args.counterfactual_every
    per_episode = per_inference * plan.inferences_per_episode
    n_episodes = len(plan.tasks) * len(plan.episodes)
    lines.append(
        f"Estimated size (uncompressed, at most): {schema.format_bytes(per_inference)} per inference, "
        f"{schema.format_bytes(per_episode)} per episode (<= {plan.inferences_per_episode} inferences), "
        f"{schema.format_bytes(per_episode * n_episodes)} for {n_episodes} episodes."
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# Output sinks (the zarr store, or the seed's pickle layout)
# ------------------------------------------------------------------------------------------------------------------


class EpisodeSinkWriter(Protocol):
    def append_step(self, record: dict[str, Any]) -> None: ...
    def finish(self, metadata: dict[str, Any]) -> None: ...


class _ZarrOutput:
    def __init__(self, args: CollectionArgs, manifest: dict[str, Any]):
        self.writer = _store.LatentStoreWriter.create_or_open(
            args.output_dir, manifest, resume=args.resume, queue_size=args.queue_size, resume_ignore=RESUME_IGNORE
        )
        self._reader: _store.LatentStore | None = None  # the episodes complete before this run

    def completed(self, task: dict[str, Any]) -> set[int]:
        return {k for t, k in self.writer.completed if t == task["task_id"]}

    def previous_outcome(self, task_id: int, k: int) -> EpisodeOutcome:
        if self._reader is None:
            self._reader = _store.open_store(self.writer.root)
        meta = self._reader.episode(task_id, k).metadata
        return EpisodeOutcome(task_id, k, bool(meta["success"]), int(meta["total_steps"]), meta.get("error"), True)

    def begin(self, task: dict[str, Any], k: int, attrs: dict[str, Any]) -> EpisodeSinkWriter:
        return self.writer.begin_episode(task, k, attrs)

    def close(self) -> None:
        self.writer.close()


class _PickleOutput:
    def __init__(self, args: CollectionArgs, manifest: dict[str, Any]):
        self.args = args
        self.manifest = manifest  # stored in each pickle (the analysis reads layer ids and cameras from it)
        self.writers: dict[int, pickle_format.PickleTaskWriter] = {}

    def _writer(self, task: dict[str, Any]) -> pickle_format.PickleTaskWriter:
        tid = task["task_id"]
        if tid not in self.writers:
            self.writers[tid] = pickle_format.PickleTaskWriter(
                self.args.output_dir, task, resume=self.args.resume, manifest=self.manifest
            )
        return self.writers[tid]

    def completed(self, task: dict[str, Any]) -> set[int]:
        return self._writer(task).completed

    def previous_outcome(self, task_id: int, k: int) -> EpisodeOutcome:
        meta = self.writers[task_id].data["episodes"][f"episode_{k}"]["metadata"]
        return EpisodeOutcome(task_id, k, bool(meta["success"]), int(meta["total_steps"]), meta.get("error"), True)

    def begin(self, task: dict[str, Any], k: int, attrs: dict[str, Any]) -> EpisodeSinkWriter:
        return self._writer(task).begin_episode(k, attrs)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------


def _episode_noise(args: CollectionArgs, task_id: int, k: int, shape: tuple[int, int]) -> Iterator[np.ndarray]:
    rng = np.random.default_rng([args.seed, task_id, k])
    while True:
        yield rng.standard_normal(shape, dtype=np.float32)


def _task_dict(task: libero.TaskInfo) -> dict[str, Any]:
    return {"task_id": task.task_id, "task_name": task.name, "suite": task.suite, "language": task.language}


def _step_record(
    t: int, element: dict[str, Any], result: dict[str, Any], replan_steps: int, store_images: bool
) -> dict[str, Any]:
    actions = np.asarray(result["actions"], np.float32)
    record = {
        "t": t,
        "prompt": element["prompt"],
        "actions": actions,  # the full chunk [H, 7] after the output transforms
        "executed_actions": actions[:replan_steps],  # queued for execution (the episode may end earlier)
        "model_actions": np.asarray(result["model_actions"], np.float32),  # normalized model output [H, AD]
        "noise": np.asarray(result["noise"], np.float32),
        "state": np.asarray(element["observation/state"], np.float32),
        **result["latents"],
    }
    if store_images:
        record["image"] = element["observation/image"]
        record["wrist_image"] = element["observation/wrist_image"]
    return record


def run_task_episode(
    args: CollectionArgs,
    plan: Plan,
    policy: Policy,
    env: libero.LiberoEnv,
    writer: EpisodeSinkWriter,
    k: int,
) -> libero.EpisodeResult:
    """One episode: rollout with openpi's protocol, one record per inference, optional counterfactual reruns."""
    task = env.task
    config = policy.model.config
    noise = _episode_noise(args, task.task_id, k, (config.action_horizon, config.action_dim))
    cf_prompt = counterfactual_prompt(args, task)
    pending: dict[str, Any] = {}
    count = 0

    def policy_fn(element: dict[str, Any]) -> np.ndarray:
        nonlocal count
        result = policy.infer_with_latents(element, noise=next(noise), capture=args.capture)
        pending["element"], pending["result"] = element, result
        if cf_prompt is not None and count % args.counterfactual_every == 0:
            cf = policy.infer_with_latents(
                {**element, "prompt": cf_prompt}, noise=result["noise"], capture=args.capture
            )
            pending["cf"] = cf
        count += 1
        return result["actions"]

    def on_inference(t: int, element: dict[str, Any], chunk: np.ndarray) -> None:
        record = _step_record(t, pending.pop("element"), pending.pop("result"), args.replan_steps, args.store_images)
        cf = pending.pop("cf", None)
        if cf is not None:
            record[schema.counterfactual("prompt")] = cf_prompt
            record[schema.counterfactual("actions")] = np.asarray(cf["actions"], np.float32)
            record[schema.counterfactual("model_actions")] = np.asarray(cf["model_actions"], np.float32)
            record.update({schema.counterfactual(key): v for key, v in cf["latents"].items()})
        writer.append_step(record)

    return libero.run_episode(
        env,
        k,
        policy_fn,
        max_steps=plan.max_steps,
        replan_steps=args.replan_steps,
        on_inference=on_inference,
        record_frames=args.save_videos,
        num_steps_wait=args.num_steps_wait,
    )


def _manifest(args: CollectionArgs, plan: Plan) -> dict[str, Any]:
    return {
        "kind": "pi0 LIBERO latent collection",
        "arguments": dataclasses.asdict(args),
        "capture_spec": args.capture.to_dict(),
        "checkpoint": args.checkpoint or plan.preset.default_checkpoint or f"random(seed={plan.preset.param_seed})",
        "preset": plan.preset.name,
        "model_config": plan.preset.model_config.describe(),
        "suite": plan.tasks[0].suite,
        "max_steps": plan.max_steps,
        "text_start": plan.preset.model_config.text_start,
        "segment_names": list(plan.preset.model_config.segment_names),
        "suffix_segment_names": list(plan.preset.model_config.suffix_segment_names),
    }


def _pickle_path(args: CollectionArgs, task: libero.TaskInfo) -> pathlib.Path:
    return args.output_dir / pickle_format.PICKLE_DIR / pickle_format.pickle_file_name(task.task_id, task.name)


def check_output(args: CollectionArgs, plan: Plan, manifest: dict[str, Any]) -> None:
    """The checks of opening the output, without writing anything (so that they fail before the policy loads).

    Raises PermissionError / NotADirectoryError for a directory that cannot be written, FileExistsError for existing
    output without ``--resume`` (or a non-empty directory that is not a latent store), ValueError for a resume whose
    settings differ from the stored run's. Opening the store checks the same again.
    """
    root = _store.check_writable(args.output_dir)
    if args.output_format == "pickle":
        existing = [t.task_id for t in plan.tasks if _pickle_path(args, t).exists()]
        if existing and not args.resume:
            raise FileExistsError(
                f"{root / pickle_format.PICKLE_DIR} already holds tasks {existing}; pass --resume to continue or "
                "choose a new --output-dir."
            )
        return
    _store.LatentStoreWriter.check_can_open(
        root, manifest_lib.complete_manifest(manifest), resume=args.resume, resume_ignore=RESUME_IGNORE
    )


_M_ARENA_MAX = -8  # glibc mallopt parameter


def limit_malloc_arenas(max_arenas: int = 2) -> bool:
    """Caps glibc's malloc arenas (like ``MALLOC_ARENA_MAX``) for threads that start later; True if it applied.

    glibc gives threads their own malloc arenas; with the threads of JAX, the store writer and Mesa's software
    renderer, the memory an episode frees stays fragmented across them and a collection's RSS grew by ~60 MiB per
    50-step episode (tiny preset, 2 CPU cores) without bound; with 2 arenas it stays flat. Only threads created after
    the call are affected, so `collect` calls it first (before the policy and the env start theirs). A no-op when
    ``MALLOC_ARENA_MAX`` is set or the C library is not glibc.
    """
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_ARENA_MAX, max_arenas))


def collect(args: CollectionArgs, *, policy: Policy | None = None) -> list[EpisodeOutcome]:
    """Runs the collection; returns one outcome per planned episode (including ones kept from a resumed run).

    Every check that can fail on bad input (arguments, capture spec, output directory, checkpoint and norm stats)
    runs before any env is created, in that order, and raises `SetupError`; the output is only written once all of
    them passed. `policy`: use this policy instead of loading the preset's (it must sample `num_denoise_steps` steps).
    Caps glibc's malloc arenas for the rest of the process (see `limit_malloc_arenas`).
    """
    limit_malloc_arenas()
    libero.configure_headless_rendering()
    try:
        plan = make_plan(args)
        manifest = manifest_lib.complete_manifest(_manifest(args, plan))
        check_output(args, plan, manifest)
        if policy is None:
            logger.info("Loading policy %s (%s)", plan.preset.name, args.checkpoint or "preset default")
            policy = policy_config.create_trained_policy(
                plan.preset,
                args.checkpoint,
                asset_id=args.asset_id,
                sample_kwargs={"num_steps": args.num_denoise_steps},
                rng_seed=args.seed,
            )
        output: _ZarrOutput | _PickleOutput = (
            _ZarrOutput(args, manifest) if args.output_format == "zarr" else _PickleOutput(args, manifest)
        )
    except _SETUP_ERRORS as e:
        raise SetupError(str(e)) from e
    try:
        print(describe_capture(args, plan, policy), flush=True)
        return _run(args, plan, policy, output)
    finally:
        output.close()


def _run(args: CollectionArgs, plan: Plan, policy: Policy, output: _ZarrOutput | _PickleOutput) -> list[EpisodeOutcome]:
    outcomes: list[EpisodeOutcome] = []
    todo: dict[int, list[int]] = {}
    for task in plan.tasks:
        task_dict = _task_dict(task)
        done = output.completed(task_dict)
        for k in plan.episodes:
            if k in done:
                outcomes.append(output.previous_outcome(task.task_id, k))
        todo[task.task_id] = [k for k in plan.episodes if k not in done]
    n_todo = sum(len(v) for v in todo.values())
    if outcomes:
        print(f"Resuming: {len(outcomes)} episodes already complete, {n_todo} to run.", flush=True)
    video_dir = args.output_dir / "videos"

    bar = tqdm.tqdm(total=n_todo, desc="episodes", unit="ep", dynamic_ncols=True)
    for task in plan.tasks:
        if not todo[task.task_id]:
            continue
        task_dict = _task_dict(task)
        with libero.LiberoEnv(task.suite, task.task_id, seed=args.seed) as env:
            for k in todo[task.task_id]:
                if env.num_resets < k:  # --resume skipped episodes: give episode k the scene of an uninterrupted run
                    logger.info("Replaying %d env resets for episode %d.", k - env.num_resets, k)
                    env.replay_resets(k)
                attrs = {
                    "init_state_index": k,
                    "seed": args.seed,
                    "prompt": task.language,
                    "max_steps": plan.max_steps,
                    "counterfactual_prompt": counterfactual_prompt(args, task),
                }
                writer = output.begin(task_dict, k, attrs)
                result = run_task_episode(args, plan, policy, env, writer, k)
                writer.finish(
                    {
                        "success": bool(result.success),
                        "total_steps": int(result.total_steps),
                        "error": result.error,
                        "wall_time_s": round(result.wall_time_s, 3),
                        "num_inferences": int(result.num_inferences),
                    }
                )
                if args.save_videos and result.frames:
                    name = f"task{task.task_id:03d}_ep{k:03d}_{'success' if result.success else 'failure'}.mp4"
                    libero.save_video(result.frames, video_dir / name)
                outcomes.append(EpisodeOutcome(task.task_id, k, result.success, result.total_steps, result.error))
                successes = sum(o.success for o in outcomes)
                bar.update(1)
                bar.set_postfix(
                    task=task.task_id, success=f"{successes}/{len(outcomes)} ({successes / len(outcomes):.0%})"
                )
                logger.info(
                    "task %d episode %d: %s after %d steps%s",
                    task.task_id,
                    k,
                    "success" if result.success else "failure",
                    result.total_steps,
                    f" (error: {result.error})" if result.error else "",
                )
    bar.close()
    return outcomes


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
