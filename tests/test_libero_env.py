"""openpi.envs.libero: protocol loop on a fake env (fast) and the real LIBERO simulator with EGL (marker `libero`).

At most one real env is alive at a time (module-scoped fixture, ~2 GB RSS).
"""

import math

import numpy as np
import pytest
from PIL import Image

from openpi.envs import base
from openpi.envs import libero as L

# robosuite 1.4 emits DeprecationWarnings at import (Logger.warn, an invalid escape in its logo string).
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:robosuite"),
    pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning"),
]

# ---------------------------------------------------------------------------------------------------------------
# Without the simulator.


def test_validate_suite():
    assert L.validate_suite("libero_goal") == "libero_goal"
    with pytest.raises(ValueError, match="libero_spatial, libero_object, libero_goal, libero_10, libero_90"):
        L.validate_suite("libero_100")
    assert L.MAX_STEPS == {
        "libero_spatial": 220,
        "libero_object": 280,
        "libero_goal": 300,
        "libero_10": 520,
        "libero_90": 400,
    }
    assert list(L.DUMMY_ACTION) == [0] * 6 + [-1]


def test_quat2axisangle_formula():
    # 90 degrees about z: xyzw = (0, 0, sin 45, cos 45).
    q = np.array([0.0, 0.0, math.sin(math.pi / 4), math.cos(math.pi / 4)])
    q_before = q.copy()
    np.testing.assert_allclose(L.quat2axisangle(q), [0.0, 0.0, math.pi / 2], atol=1e-12)
    np.testing.assert_array_equal(q, q_before)  # input not modified
    # Identity and w slightly above 1 (clipped): zero rotation.
    np.testing.assert_array_equal(L.quat2axisangle(np.array([0.0, 0.0, 0.0, 1.0])), np.zeros(3))
    np.testing.assert_array_equal(L.quat2axisangle(np.array([1e-9, 0.0, 0.0, 1.0 + 1e-7])), np.zeros(3))
    # w < 0 keeps robosuite's convention (angle 2*acos(w) > pi), no shortest-path flip.
    q = np.array([0.6, 0.0, 0.0, -0.8])
    np.testing.assert_allclose(L.quat2axisangle(q), [2 * math.acos(-0.8), 0.0, 0.0], atol=1e-12)


class _FakeEnv:
    """Duck-typed LiberoEnv (a `base.Env` returning LIBERO observations): counts steps, reports done at `done_at`
    (1-based env step), raises at `raise_at`."""

    max_steps = 300
    prompt = "fake task"
    action_dim = L.ACTION_DIM
    policy_input = staticmethod(L.to_policy_input)
    frame = staticmethod(L.policy_image)

    def __init__(self, done_at=None, raise_at=None):
        self.done_at, self.raise_at = done_at, raise_at
        self.steps = 0
        self.actions = []

    def check_init_state_index(self, k):
        if k != 0:
            raise ValueError("init_state_index out of range")

    def _obs(self):
        image = np.full((L.ENV_RESOLUTION, L.ENV_RESOLUTION, 3), self.steps % 256, np.uint8)
        return {
            L.AGENTVIEW_KEY: image,
            L.WRIST_KEY: image,
            "robot0_eef_pos": np.array([0.1, 0.2, float(self.steps)]),
            "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
            "robot0_gripper_qpos": np.array([0.04, -0.04]),
        }

    def reset(self, k, *, num_steps_wait=10):
        self.steps = 0
        return self._obs()

    def step(self, action):
        self.steps += 1
        if self.steps == self.raise_at:
            raise ValueError("mujoco went unstable")
        self.actions.append(np.asarray(action))
        return self._obs(), 0.0, self.steps == self.done_at, {}


def _counting_policy(chunk_len=50):
    """Chunk whose action i of call c is [c, i, 0, 0, 0, 0, -1], to check which actions are executed."""
    calls = []

    def policy(inp):
        calls.append(inp)
        chunk = np.zeros((chunk_len, 7))
        chunk[:, 0] = len(calls) - 1
        chunk[:, 1] = np.arange(chunk_len)
        chunk[:, 6] = -1
        return chunk

    return policy, calls


def test_run_episode_protocol_fake_env():
    env = _FakeEnv()
    policy, calls = _counting_policy()
    seen = []
    result = base.run_episode(env, 0, policy, max_steps=12, on_inference=lambda t, inp, c: seen.append((t, c.shape)))
    assert (result.success, result.total_steps, result.num_inferences, result.error) == (False, 12, 3, None)
    assert seen == [(0, (50, 7)), (5, (50, 7)), (10, (50, 7))]
    # Each chunk's first 5 actions are executed, in order.
    executed = [(int(a[0]), int(a[1])) for a in env.actions]
    assert executed == [(0, i) for i in range(5)] + [(1, i) for i in range(5)] + [(2, 0), (2, 1)]
    # The policy saw the observation of the step it was asked at (eef z = env steps so far).
    assert [float(c["observation/state"][2]) for c in calls] == [0.0, 5.0, 10.0]
    assert calls[0]["prompt"] == "fake task"
    assert result.frames is None


def test_run_episode_success_and_frames_fake_env():
    env = _FakeEnv(done_at=7)
    policy, _ = _counting_policy()
    result = base.run_episode(env, 0, policy, max_steps=300, record_frames=True)
    assert (result.success, result.total_steps, result.num_inferences) == (True, 7, 2)
    assert len(result.frames) == 8 and result.frames[0].shape == (224, 224, 3)
    assert [int(f[100, 100, 0]) for f in result.frames] == list(range(8))


def test_run_episode_env_error_is_a_failure_policy_error_propagates():
    env = _FakeEnv(raise_at=4)
    policy, _ = _counting_policy()
    result = base.run_episode(env, 0, policy, max_steps=300)
    assert (result.success, result.total_steps) == (False, 3)
    assert result.error == "env.step failed at t=3: ValueError: mujoco went unstable"

    def broken_policy(inp):
        raise RuntimeError("policy server down")

    with pytest.raises(RuntimeError, match="policy server down"):
        base.run_episode(_FakeEnv(), 0, broken_policy, max_steps=10)
    with pytest.raises(ValueError, match=r"action chunk \[H, 7\] with H >= replan_steps=5, got shape \(3, 7\)"):
        base.run_episode(_FakeEnv(), 0, lambda inp: np.zeros((3, 7)), max_steps=10)
    with pytest.raises(ValueError, match="out of range"):
        base.run_episode(_FakeEnv(), 1, policy, max_steps=10)


# ---------------------------------------------------------------------------------------------------------------
# Real LIBERO.


@pytest.mark.libero
def test_task_lookup():
    tasks = L.list_tasks("libero_goal")
    assert len(tasks) == 10
    assert [t.task_id for t in tasks] == list(range(10))
    t0 = L.get_task("libero_goal", 0)
    assert t0.language == "open the middle drawer of the cabinet"
    assert t0.bddl_file.endswith("libero_goal/open_the_middle_drawer_of_the_cabinet.bddl")
    assert t0.num_init_states == 50
    assert L.get_init_states("libero_goal", 0).shape[0] == 50
    with pytest.raises(ValueError, match=r"task_id 10 is out of range for libero_goal: valid task ids are 0\.\.9"):
        L.get_task("libero_goal", 10)
    with pytest.raises(ValueError, match="valid suites"):
        L.list_tasks("libero_100")
    assert len(L.list_tasks("libero_90")) == 90


@pytest.fixture(scope="module")
def goal_env():
    with L.LiberoEnv("libero_goal", 0) as env:
        yield env


def _zero_motion_policy(inp):
    return np.tile(np.asarray(L.DUMMY_ACTION), (50, 1))


@pytest.mark.libero
def test_reset_and_policy_input(goal_env):
    with pytest.raises(ValueError, match=r"valid indices are 0\.\.49"):
        goal_env.reset(50)
    obs = goal_env.reset(0)
    assert obs[L.AGENTVIEW_KEY].shape == (256, 256, 3) and obs[L.AGENTVIEW_KEY].dtype == np.uint8
    inp = L.to_policy_input(obs, goal_env.prompt)
    assert set(inp) == {"observation/image", "observation/wrist_image", "observation/state", "prompt"}
    assert inp["prompt"] == "open the middle drawer of the cabinet"
    for key, raw_key in [("observation/image", L.AGENTVIEW_KEY), ("observation/wrist_image", L.WRIST_KEY)]:
        image = inp[key]
        assert image.shape == (224, 224, 3) and image.dtype == np.uint8
        # 180 degree rotation then (for a square image) a plain bilinear resize, done independently with PIL.
        expected = Image.fromarray(obs[raw_key]).rotate(180).resize((224, 224), Image.BILINEAR)
        np.testing.assert_array_equal(image, np.asarray(expected))
        # The raw render is upside down: the rotation is not a no-op.
        assert not np.array_equal(image, np.asarray(Image.fromarray(obs[raw_key]).resize((224, 224))))

    state = inp["observation/state"]
    assert state.shape == (8,) and state.dtype == np.float32
    np.testing.assert_array_equal(state[:3], obs["robot0_eef_pos"].astype(np.float32))
    np.testing.assert_array_equal(state[6:], obs["robot0_gripper_qpos"].astype(np.float32))
    x, y, z, w = obs["robot0_eef_quat"]
    angle = 2 * math.acos(w)
    axis = np.array([x, y, z]) / math.sqrt(1 - w * w)
    np.testing.assert_allclose(state[3:6], axis * angle, rtol=1e-6, atol=1e-6)


@pytest.mark.libero
def test_run_episode_runs_out_of_steps(goal_env, tmp_path):
    seen = []
    result = base.run_episode(
        goal_env,
        1,
        _zero_motion_policy,
        max_steps=20,
        on_inference=lambda t, inp, chunk: seen.append((t, inp["observation/state"].shape, chunk.shape)),
        record_frames=True,
    )
    assert result.success is False and result.error is None
    assert result.total_steps == 20
    assert result.num_inferences == math.ceil(20 / 5)
    assert [t for t, _, _ in seen] == [0, 5, 10, 15]
    assert all(s == (8,) and c == (50, 7) for _, s, c in seen)
    assert result.init_state_index == 1 and result.wall_time_s > 0
    assert len(result.frames) == 21 and result.frames[-1].shape == (224, 224, 3)
    video = base.save_video(result.frames, tmp_path / "videos" / "ep.mp4")
    assert video.stat().st_size > 1000


@pytest.mark.libero
def test_success_label_from_real_predicate(goal_env):
    """Open the middle drawer by setting its joint inside the sim; LIBERO's own goal check must then fire."""
    inner = goal_env.raw.env  # the robosuite env
    cabinet = inner.get_object("wooden_cabinet_1")
    (joint,) = inner.object_sites_dict["wooden_cabinet_1_middle_region"].joints
    lo, hi = cabinet.object_properties["articulation"]["default_open_ranges"]  # LIBERO's "open" range

    def policy(inp):
        policy.calls += 1
        if policy.calls == 2:  # the inference at t=5: move the drawer into the goal configuration
            inner.sim.data.set_joint_qpos(joint, (lo + hi) / 2)
            inner.sim.forward()
        return _zero_motion_policy(inp)

    policy.calls = 0
    result = base.run_episode(goal_env, 0, policy)  # suite default max_steps (300)
    assert result.error is None
    assert result.success is True
    assert result.total_steps == 6  # the env step taken at t=5 reported done
    assert result.num_inferences == 2
    assert goal_env.raw.check_success()
