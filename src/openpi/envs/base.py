"""What the collection needs from a simulator, and the simulator-agnostic rollout loop.

A simulator module in `openpi.envs` (e.g. `openpi.envs.libero`) exposes one `Simulator`: its task suites, the shape
of what it hands the policy, its protocol defaults and a factory for a per-task `Env`. `run_episode` drives any `Env`
with openpi's evaluation protocol: reset to an initial state, wait steps, then execute the first `replan_steps`
actions of each predicted chunk before asking the policy again, until the task succeeds or `max_steps` env steps ran.

Pure numpy / stdlib: a simulator's own imports stay in its module.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, Self

import numpy as np

logger = logging.getLogger(__name__)

# openpi's replanning interval: actions executed from each chunk before the next inference.
REPLAN_STEPS = 5
# The key under which the policy input carries the instruction (openpi's convention for every robot).
PROMPT_KEY = "prompt"

Observation = Mapping[str, Any]  # what the simulator returns (raw; `Env.policy_input` converts it)


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """One task of a suite: what the collection records about it and needs to plan its episodes."""

    suite: str
    task_id: int
    name: str  # the simulator's task name (a file-name-safe identifier)
    language: str  # the instruction, sent as the prompt
    num_init_states: int  # episode k starts from initial state k


class Env(Protocol):
    """One task's simulator, reused across that task's episodes (create one per task; close it at the end)."""

    task: TaskInfo

    @property
    def action_dim(self) -> int: ...
    @property
    def prompt(self) -> str: ...
    @property
    def max_steps(self) -> int:
        """Env steps an episode may take after the wait steps (the suite's default)."""
        ...

    @property
    def num_resets(self) -> int: ...
    def check_init_state_index(self, init_state_index: int) -> None:
        """Raises ValueError if `init_state_index` is not an initial state of the task (or the env is closed)."""
        ...

    def reset(self, init_state_index: int, *, num_steps_wait: int = ...) -> Observation:
        """Resets to initial state `init_state_index`, runs `num_steps_wait` no-op steps, returns the observation."""
        ...

    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, dict]:
        """One control step: (observation, reward, done = task success, info)."""
        ...

    def replay_resets(self, until: int) -> None:
        """Resets without running episodes until `num_resets == until` (a resumed run's skipped episodes)."""
        ...

    def policy_input(self, obs: Observation, prompt: str) -> dict[str, Any]:
        """The element the policy gets for `obs` (images, state and `prompt` under the simulator's keys)."""
        ...

    def frame(self, obs: Observation) -> np.ndarray:
        """A uint8 [H, W, 3] video frame of `obs` (the policy's view of the main camera)."""
        ...

    def close(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(self, *exc: object) -> None: ...


@dataclasses.dataclass(frozen=True)
class Simulator:
    """A simulator family as the collection sees it; each module in `openpi.envs` defines one as ``SIMULATOR``."""

    name: str  # the registry name (`openpi.envs.get(name)`)
    suites: tuple[str, ...]
    action_dim: int  # dims of one executed action
    image_shape: tuple[int, int, int]  # each camera image in the policy input, uint8 [H, W, C]
    # Record key -> policy-input key of each camera image the collection stores, and of the proprioceptive state.
    camera_keys: Mapping[str, str]
    state_key: str
    default_seed: int
    num_steps_wait: int  # no-op steps after each reset while objects settle
    validate_suite: Callable[[str], str]  # returns the suite, or raises ValueError listing the valid ones
    list_tasks: Callable[[str], tuple[TaskInfo, ...]]  # in the suite's task order
    get_task: Callable[[str, int], TaskInfo]  # raises ValueError naming the valid task ids
    default_max_steps: Callable[[str], int]  # env steps per episode after the wait steps
    make_env: Callable[[TaskInfo, int], Env]  # (task, seed) -> a live env
    configure: Callable[[], None] = lambda: None  # process-wide setup to run before the simulator is imported
    # (task, initial-state index) -> a digest of the simulator state the episode starts from (None: unknown). Two
    # runs' episodes are paired only when their digests agree (`openpi.latents.analysis` behaviour).
    init_state_digest: Callable[[TaskInfo, int], str | None] = lambda task, k: None


def state_digest(state: np.ndarray) -> str:
    """``sha256:<hex>`` of an initial state's float64 values (C order) and shape: equal digests, equal states."""
    import hashlib

    a = np.ascontiguousarray(np.asarray(state, np.float64))
    h = hashlib.sha256(repr(a.shape).encode())
    h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


@dataclasses.dataclass(frozen=True)
class EpisodeResult:
    success: bool  # the env reported done within max_steps
    total_steps: int  # env steps executed after the wait steps (the successful step included)
    num_inferences: int
    error: str | None  # the env's exception, if one ended the episode (then success is False)
    wall_time_s: float  # reset + wait steps + loop
    init_state_index: int
    # With record_frames=True: `Env.frame` after the wait steps and after every executed step (total_steps + 1).
    frames: tuple[np.ndarray, ...] | None = dataclasses.field(default=None, repr=False, compare=False)


PolicyFn = Callable[[dict[str, Any]], np.ndarray]
InferenceCallback = Callable[[int, dict[str, Any], np.ndarray], None]


@dataclasses.dataclass
class _Rollout:
    """The running state of one episode (what `EpisodeResult` reports)."""

    init_state_index: int
    record_frames: bool
    start: float = dataclasses.field(default_factory=time.perf_counter)
    t: int = 0
    num_inferences: int = 0
    success: bool = False
    error: str | None = None
    frames: list[np.ndarray] = dataclasses.field(default_factory=list)

    def fail(self, error: str) -> None:
        self.error = error
        logger.warning("Episode %d failed: %s", self.init_state_index, error)

    def result(self) -> EpisodeResult:
        return EpisodeResult(
            success=self.success,
            total_steps=self.t,
            num_inferences=self.num_inferences,
            error=self.error,
            wall_time_s=time.perf_counter() - self.start,
            init_state_index=self.init_state_index,
            frames=tuple(self.frames) if self.record_frames else None,
        )


def _check_chunk(chunk: np.ndarray, replan_steps: int, action_dim: int) -> None:
    if chunk.ndim != 2 or chunk.shape[0] < replan_steps or chunk.shape[1] != action_dim:
        raise ValueError(
            f"policy_fn must return an action chunk [H, {action_dim}] with H >= replan_steps={replan_steps}, "
            f"got shape {chunk.shape}."
        )


def run_episode(
    env: Env,
    init_state_index: int,
    policy_fn: PolicyFn,
    *,
    max_steps: int | None = None,
    replan_steps: int = REPLAN_STEPS,
    prompt: str | None = None,
    on_inference: InferenceCallback | None = None,
    record_frames: bool = False,
    num_steps_wait: int | None = None,
) -> EpisodeResult:
    """Runs one episode with openpi's protocol.

    policy_fn(policy_input) -> action chunk [H, env.action_dim] with H >= replan_steps; its first `replan_steps`
    actions are executed before it is asked again. on_inference(t, policy_input, chunk) is called right after each
    policy call; t counts env steps after the wait steps. `max_steps` defaults to the env's, `prompt` to the task's
    instruction, `num_steps_wait` (no-op steps after the reset, not counted in t) to the env's.
    An exception raised by the env (reset or step) ends the episode as a failure with the error recorded;
    exceptions from policy_fn or on_inference propagate.
    """
    max_steps = env.max_steps if max_steps is None else max_steps
    prompt = env.prompt if prompt is None else prompt
    if replan_steps < 1:
        raise ValueError(f"replan_steps must be >= 1, got {replan_steps}.")
    env.check_init_state_index(init_state_index)  # a caller error raises, it is not a failed episode
    run = _Rollout(init_state_index, record_frames)
    wait = {} if num_steps_wait is None else {"num_steps_wait": num_steps_wait}
    try:
        obs = env.reset(init_state_index, **wait)
    except Exception as e:  # the simulator may raise anything; recorded as a failed episode
        run.fail(f"env.reset failed: {type(e).__name__}: {e}")
        return run.result()
    if record_frames:
        run.frames.append(env.frame(obs))

    plan: collections.deque[np.ndarray] = collections.deque()
    while run.t < max_steps:
        if not plan:
            policy_input = env.policy_input(obs, prompt)
            chunk = np.asarray(policy_fn(policy_input))
            run.num_inferences += 1
            _check_chunk(chunk, replan_steps, env.action_dim)
            if on_inference is not None:
                on_inference(run.t, policy_input, chunk)
            plan.extend(chunk[:replan_steps])
        try:
            obs, _, done, _ = env.step(plan.popleft())
        except Exception as e:  # see above
            run.fail(f"env.step failed at t={run.t}: {type(e).__name__}: {e}")
            break
        run.t += 1
        if record_frames:
            run.frames.append(env.frame(obs))
        if done:
            run.success = True
            break
    return run.result()


def save_video(frames: Sequence[np.ndarray], path: str | os.PathLike, fps: int = 10) -> pathlib.Path:
    """Writes uint8 [H, W, 3] frames to a video file (mp4 via imageio-ffmpeg); creates the parent directory."""
    if len(frames) == 0:
        raise ValueError("save_video got no frames; run the episode with record_frames=True.")
    import imageio

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(path, [np.asarray(f, dtype=np.uint8) for f in frames], fps=fps)
    return path
