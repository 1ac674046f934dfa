"""The collection's arguments, and the checks that need neither the model nor an env (`make_plan`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import tyro

from openpi import envs
from openpi.envs import base as env_base
from openpi.latents.collect import conditions as conditions_lib
from openpi.latents.recording.args import DEFAULT_PRESET, STORE_RESUME_IGNORE, CaptureArgs, PolicyArgs, StoreArgs
from openpi.latents.recording.disk import NoSpaceError
from openpi.latents.recording.reruns import check_teacher_forced, other_task_draw
from openpi.latents.store import location
from openpi.latents.store import manifest as manifest_lib
from openpi.policies import presets


class SetupError(ValueError):
    """The run cannot start: a bad argument, a missing checkpoint or norm stats, or an unusable output directory.

    Raised by `collect` before any env is created or anything is written; the message says what to fix (the original
    exception is the ``__cause__``). Errors during the rollouts are not wrapped.
    """


# What the setup phase raises for bad input (wrapped in SetupError by `collect`).
SETUP_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    NotADirectoryError,
    ImportError,
    NoSpaceError,
    location.ObjectStoreError,
    ConnectionError,  # --backend ray: an unreachable cluster
)
# Arguments a resumed run may change: they add or show work but do not change what an episode records.
RESUME_IGNORE = (
    manifest_lib.DEFAULT_RESUME_IGNORE
    | STORE_RESUME_IGNORE
    | {
        "arguments.task_ids",
        "arguments.episodes_per_task",
        "arguments.save_videos",
        # How many episodes run at once, and where, does not change what one records; batching changes float rounding
        # only (tests/test_batching.py), so a resume may switch it.
        "arguments.num_envs",
        "arguments.batch_inference",
        "arguments.env_worker_timeout_s",
        "arguments.backend",
        "arguments.ray_address",
    }
)
# Library parameters whose fix a setup error names, and the flag a command-line user gives it with.
CLI_FLAGS = {"asset_id": "--asset-id", "checkpoint_dir": "--checkpoint", "allow_pickle": "--allow-pickle"}
# The defaults below that belong to a simulator (wait steps, seed) are the default preset's simulator's.
_DEFAULT_SIMULATOR = envs.get(presets.get_preset(DEFAULT_PRESET).env)
TASK_SUITE_HELP = (
    f"Task suite of the preset's simulator; {_DEFAULT_SIMULATOR.name}: {', '.join(_DEFAULT_SIMULATOR.suites)}. "
    "List a suite's tasks (ids, names, instructions) with --list-tasks. (openpi's --task-suite-name)"
)
# openpi's LIBERO example spells some flags differently: what to type here instead.
OPENPI_FLAG_HINTS = {
    "--task-suite-name": "--task-suite",
    "--num-trials-per-task": "--episodes-per-task (episode k starts from initial state k; openpi runs 50)",
}


@dataclasses.dataclass(frozen=True)
class CollectionArgs(StoreArgs, CaptureArgs, PolicyArgs):
    """Run pi0 in simulator episodes (LIBERO by default) and record its latents at every inference.

    The policy, capture and store flags are the shared groups of `openpi.latents.recording.args`."""

    task_suite: Annotated[str, tyro.conf.arg(help=TASK_SUITE_HELP)] = "libero_goal"
    # Task ids to run (default: every task of the suite).
    task_ids: tuple[int, ...] = ()
    # Episodes per task; episode k starts from the suite's initial state k (openpi's --num-trials-per-task, 50).
    episodes_per_task: int = 10
    # Env steps per episode after the wait steps (default: openpi's per-suite value, e.g. 300 for libero_goal).
    max_steps: int | None = None
    # Actions executed from each predicted chunk before the next inference.
    replan_steps: int = env_base.REPLAN_STEPS
    # No-op steps after each reset while objects settle (not counted in t).
    num_steps_wait: int = _DEFAULT_SIMULATOR.num_steps_wait
    # env.seed(...) and the noise seed.
    seed: int = _DEFAULT_SIMULATOR.default_seed
    # "zarr": the streaming latent store; "pickle": the original pre-store layout,
    # inference_latents/task_{id}_{name}.pkl (whole task in RAM; small captures only).
    output_format: Literal["zarr", "pickle"] = "zarr"
    # Save an MP4 of the agent view per episode under <output_dir>/videos.
    save_videos: bool = False
    # Re-run inferences with a counterfactual prompt (same observation and noise): "blank" (empty prompt) or
    # "other-task" (the instruction of another task of the suite, drawn at random per episode from the seed and
    # recorded: `other_task_draw`). Stored under cf_* keys.
    counterfactual: Literal["none", "blank", "other-task"] = "none"
    # Counterfactual rerun at every k-th inference of an episode.
    counterfactual_every: int = 1
    # With --counterfactual: also rerun each counterfactual inference teacher-forced, fed the baseline's x_t at every
    # denoising step, so the two runs differ by the prompt alone (expert-1 prompt sensitivity without trajectory
    # divergence). Stored under cf_tf_* keys; needs the trajectory (x_t) and an expert-1 stream in --capture.
    counterfactual_teacher_forced: bool = False
    # The closed-loop condition (prompt mode, intervention, layer sweep, text latent); default: the baseline.
    condition: conditions_lib.ConditionArgs = conditions_lib.ConditionArgs()
    # Env worker processes running episodes at once (1: the sequential loop in this process). Their waiting
    # observations go through the policy together (see --batch-inference). A task's episodes are split into
    # contiguous blocks; a block starting at episode k first replays the k env resets before it, so each episode
    # sees the scene of the sequential run.
    num_envs: int = 1
    # With --num-envs > 1: run the observations of the envs that wait at the same time as ONE padded batch through
    # the model (faster; float rounding differs slightly from one observation per call). --no-batch-inference: one
    # observation per model call, and the stored arrays are identical to the sequential run's whatever --num-envs is.
    batch_inference: bool = True
    # With --num-envs > 1: an env worker that sends nothing for this many seconds while it should be stepping its
    # env (a hung simulator, a stopped process; while it makes a unit's env: at least 600 s) is killed and its unfinished episodes re-run on a fresh worker (its
    # episode in progress is discarded and begun again); the event is logged.
    env_worker_timeout_s: float = 600.0
    # "local": this machine. "ray": work units (a task's block of episodes) on a Ray cluster, a policy actor per
    # GPU (per machine on CPU) with --num-envs env workers each; needs `uv sync --extra ray`.
    backend: Literal["local", "ray"] = "local"
    # Ray cluster address for --backend ray (default: $RAY_ADDRESS, else a local Ray instance on this machine).
    ray_address: str | None = None
    # Persistent JAX compilation cache directory (default: $JAX_COMPILATION_CACHE_DIR; neither: compile every run). A
    # second run of the same model loads the compiled programs instead (tiny preset, 2 CPU cores: ~16 s -> ~3 s).
    jax_cache_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run will do, checked before anything expensive starts."""

    args: CollectionArgs
    simulator: env_base.Simulator
    preset: presets.PolicyPreset
    tasks: tuple[env_base.TaskInfo, ...]
    episodes: tuple[int, ...]
    max_steps: int
    condition: conditions_lib.Condition

    @property
    def replan_steps(self) -> int:
        return self.args.replan_steps

    @property
    def inferences_per_episode(self) -> int:
        return math.ceil(self.max_steps / self.replan_steps)


def _check_numbers(args: CollectionArgs, tasks: tuple[env_base.TaskInfo, ...]) -> None:
    ids = [t.task_id for t in tasks]
    if len(set(ids)) != len(ids):
        raise ValueError(f"--task-ids lists a task twice: {ids}.")
    if args.episodes_per_task < 1:
        raise ValueError(f"--episodes-per-task must be >= 1, got {args.episodes_per_task}.")
    for task in tasks:
        n = task.num_init_states
        if args.episodes_per_task > n:
            raise ValueError(
                f"--episodes-per-task {args.episodes_per_task} exceeds the {n} initial states of "
                f"{task.suite} task {task.task_id}: episode k starts from initial state k (valid 1..{n})."
            )
    if args.replan_steps < 1 or args.num_steps_wait < 0 or args.counterfactual_every < 1:
        raise ValueError("--replan-steps and --counterfactual-every must be >= 1 and --num-steps-wait >= 0.")
    _check_parallel(args, len(tasks) * args.episodes_per_task)
    args.check_store()


def _check_parallel(args: CollectionArgs, num_episodes: int) -> None:
    if not args.env_worker_timeout_s > 0:
        raise ValueError(f"--env-worker-timeout-s must be > 0 seconds, got {args.env_worker_timeout_s}.")
    if args.num_envs < 1:
        raise ValueError(f"--num-envs must be >= 1 (env worker processes), got {args.num_envs}.")
    if args.num_envs > num_episodes:
        raise ValueError(
            f"--num-envs {args.num_envs} exceeds the work: this run has {num_episodes} episodes "
            f"(tasks x --episodes-per-task), so at most {num_episodes} envs can be busy. Lower --num-envs to "
            f"{num_episodes} or less."
        )
    if (args.num_envs > 1 or args.backend == "ray") and args.output_format != "zarr":
        raise ValueError(
            "--num-envs > 1 and --backend ray write episodes concurrently, which only the zarr store supports: "
            "use --output-format zarr (and export pickles afterwards with `openpi.latents.store.export_pickle`)."
        )
    if args.ray_address is not None and args.backend != "ray":
        raise ValueError("--ray-address is only used with --backend ray; add --backend ray or drop --ray-address.")


def make_plan(args: CollectionArgs) -> Plan:
    """Validates the arguments that need neither the model nor an env; raises ValueError naming the fix."""
    preset = args.check_policy()
    sim = envs.get(preset.env)
    suite = sim.validate_suite(args.task_suite)
    all_tasks = sim.list_tasks(suite)
    ids = args.task_ids or tuple(range(len(all_tasks)))
    tasks = tuple(sim.get_task(suite, i) for i in ids)
    _check_numbers(args, tasks)
    max_steps = sim.default_max_steps(suite) if args.max_steps is None else args.max_steps
    if max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {max_steps}.")
    check_teacher_forced(args.counterfactual_teacher_forced, args.counterfactual, args.capture)
    if args.counterfactual == "other-task" and len(all_tasks) < 2:
        raise ValueError(f"--counterfactual other-task needs a suite with two tasks or more; {suite} has one.")
    config = preset.model_config
    args.check_capture(config, args.num_denoise_steps)
    if args.replan_steps > config.action_horizon:
        raise ValueError(
            f"--replan-steps {args.replan_steps} exceeds the model's action horizon {config.action_horizon}."
        )
    condition = conditions_lib.resolve(
        args.condition, config, num_steps=args.num_denoise_steps, list_tasks=sim.list_tasks
    )
    for task in tasks:
        condition.prompt_of(task)  # a bad prompt setting raises here, before anything expensive
    return Plan(args, sim, preset, tasks, tuple(range(args.episodes_per_task)), max_steps, condition)


def counterfactual_prompt(plan: Plan, task: env_base.TaskInfo, k: int) -> str | None:
    """The prompt of the counterfactual rerun in episode `k` of `task` (None: no rerun): "" for blank, else the
    instruction of :func:`other_task_draw`'s task."""
    mode = plan.args.counterfactual
    if mode == "none":
        return None
    if mode == "blank":
        return ""
    tasks = plan.simulator.list_tasks(task.suite)
    return tasks[other_task_draw(plan.args.seed, task.task_id, k, len(tasks))].language


def openpi_flag_errors(argv: Sequence[str]) -> list[str]:
    """For each openpi spelling in `argv` (`OPENPI_FLAG_HINTS`), the message naming the flag to use instead."""
    given = {a.split("=", 1)[0] for a in argv}
    return [f"{flag} is openpi's spelling; here use {hint}." for flag, hint in OPENPI_FLAG_HINTS.items() if flag in given]


def describe_tasks(suite: str | None, preset: str = DEFAULT_PRESET) -> str:
    """`--list-tasks`: each task of `suite` (None: the suite names) of the preset's simulator, one line each."""
    sim = envs.get(presets.get_preset(preset).env)
    if suite is None:
        return f"{sim.name} suites: {', '.join(sim.suites)}. Add --task-suite NAME to list its tasks."
    lines = [f"{sim.name} suite {sim.validate_suite(suite)} (task id, name, instruction, initial states):"]
    for task in sim.list_tasks(suite):
        lines.append(f"  {task.task_id:3d}  {task.name}  {task.language!r}  ({task.num_init_states})")
    return "\n".join(lines)
