"""The collection (openpi.latents.collect + scripts/inference_latent_collection.py) on the REAL LIBERO simulator.

Everything runs the tiny random-weight preset (`pi0_libero_tiny`) on libero_goal task 0 ("open the middle drawer of
the cabinet") with short episodes. One in-process run is shared by the structure / success / counterfactual / video
tests (module fixture `goal_run`); the crash test runs the CLI in subprocesses. At most one LIBERO env is alive per
process at a time.

Success labelling uses the same trick as tests/test_libero_env.py: a thin wrapper around the real policy sets the
middle drawer's joint into LIBERO's own "open" range through the sim at the episode's 2nd inference, so LIBERO's
unmodified success predicate fires at the next env step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import ClassVar

import ml_dtypes
import numpy as np
import pytest
import tyro
from store_kill_helper import sigkill_once_committed

from openpi.envs import libero as L
from openpi.latents import collect as collection
from openpi.latents import store
from openpi.models.capture import CaptureSpec
from openpi.policies import policy_config

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:robosuite"),
    pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning"),
    # imageio starts ffmpeg with fork+exec while JAX threads exist (harmless: the child execs at once).
    pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning"),
]

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "inference_latent_collection.py"
TINY_CHECKPOINT = REPO / "tests" / "data" / "pi0_tiny_a" / "checkpoint"  # holds params/ and assets/test/ only
SUITE, TASK_ID = "libero_goal", 0
PROMPT = "open the middle drawer of the cabinet"
TASK_NAME = "open_the_middle_drawer_of_the_cabinet"
NUM_DENOISE_STEPS = 10
BF16 = ml_dtypes.bfloat16


def tiny_args(output_dir: pathlib.Path, **overrides) -> collection.CollectionArgs:
    base = dict(
        preset="pi0_libero_tiny",
        task_suite=SUITE,
        task_ids=(TASK_ID,),
        episodes_per_task=1,
        max_steps=20,
        num_denoise_steps=NUM_DENOISE_STEPS,
    )
    return collection.CollectionArgs(output_dir=output_dir, **{**base, **overrides})


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False
    )


def cli_args(output_dir: pathlib.Path, *extra: str) -> list[str]:
    return [
        "--preset", "pi0_libero_tiny", "--task-suite", SUITE, "--task-ids", str(TASK_ID), "--output-dir",
        str(output_dir), *extra,
    ]  # fmt: skip


def tree_snapshot(root: pathlib.Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime_ns) of every file under root: equal before and after means nothing was written."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def assert_same(actual, expected, what: str) -> None:
    if isinstance(expected, str):
        assert actual == expected, what
        return
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if expected.dtype == BF16:
        np.testing.assert_array_equal(actual.view(np.uint16), expected.view(np.uint16), err_msg=what)
    else:
        np.testing.assert_array_equal(actual, expected, err_msg=what)


def expected_fields(config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every key of a step record with the default CaptureSpec (docs/INTERFACES.md)."""
    L_, S, H, AD = config.depth, NUM_DENOISE_STEPS, config.action_horizon, config.action_dim
    w0, w1 = config.paligemma_config.width, config.action_expert_config.width
    heads, n_tok = config.action_expert_config.num_heads, config.max_token_len
    return {
        "t": ((), np.dtype(np.int64)),
        "prompt": ((), np.dtype(object)),
        "actions": ((H, 7), np.dtype(np.float32)),
        "executed_actions": ((5, 7), np.dtype(np.float32)),
        "model_actions": ((H, AD), np.dtype(np.float32)),
        "noise": ((H, AD), np.dtype(np.float32)),
        "state": ((8,), np.dtype(np.float32)),
        "image": ((224, 224, 3), np.dtype(np.uint8)),
        "wrist_image": ((224, 224, 3), np.dtype(np.uint8)),
        "expert_0_segment_means": ((L_, 1, config.num_cameras + 1, w0), np.dtype(np.float32)),  # pooled: float32
        "text_only_hidden_states": ((L_, 1, n_tok, w0), np.dtype(BF16)),
        "text_mask": ((1, n_tok), np.dtype(bool)),
        "segment_mask": ((1, config.num_cameras + 1), np.dtype(bool)),
        "tokenized_prompt": ((1, n_tok), np.dtype(np.int32)),
        "expert_1_segment_means": ((S, L_, 1, 2, w1), np.dtype(np.float32)),  # pooled: float32
        "attention_to_text": ((S, L_, 1, heads, 1 + H), np.dtype(np.float32)),
        "attention_to_text_content": ((S, L_, 1, heads, 1 + H), np.dtype(np.float32)),
        "attention_to_bos": ((S, L_, 1, heads, 1 + H), np.dtype(np.float32)),
        "attention_key_counts": ((L_, 1, heads, 1 + H, 4), np.dtype(np.float32)),
        "denoise_times": ((S,), np.dtype(np.float32)),
        "x_t": ((S + 1, 1, H, AD), np.dtype(np.float32)),
        "v_t": ((S, 1, H, AD), np.dtype(np.float32)),
    }


LATENT_KEYS = (
    "expert_0_segment_means", "text_only_hidden_states", "text_mask", "segment_mask", "tokenized_prompt",
    "expert_1_segment_means", "attention_to_text", "attention_to_text_content", "attention_to_bos",
    "attention_key_counts", "denoise_times", "x_t", "v_t",
)  # fmt: skip
CF_KEYS = {"cf_prompt", "cf_actions", "cf_model_actions", *(f"cf_{k}" for k in LATENT_KEYS)}


def check_field(value, key: str, fields) -> None:
    shape, dtype = fields[key.removeprefix("cf_")]
    if dtype == np.dtype(object):
        assert isinstance(value, str), f"{key}: {type(value)}"
        return
    value = np.asarray(value)
    assert (value.shape, value.dtype) == (shape, dtype), f"{key}: {value.shape} {value.dtype} != {shape} {dtype}"


def episode_noise(k: int, n: int, config) -> list[np.ndarray]:
    """The documented per-episode noise: draws from default_rng([seed, task_id, episode])."""
    rng = np.random.default_rng([L.DEFAULT_SEED, TASK_ID, k])
    return [rng.standard_normal((config.action_horizon, config.action_dim), dtype=np.float32) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# Setup errors: raised before the policy loads (where they can) and before any env exists; nothing is written.


def _load_script():
    spec = importlib.util.spec_from_file_location("inference_latent_collection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _NoEnv:
    def __init__(self, *args, **kwargs):
        raise AssertionError("a LIBERO env was created although the run should have failed before any rollout")


def _write_store_with_one_episode(root: pathlib.Path) -> None:
    task = {"task_id": TASK_ID, "task_name": TASK_NAME, "suite": SUITE, "language": PROMPT}
    with store.LatentStoreWriter.create_or_open(root, {"arguments": {}}, resume=False) as writer:
        ep = writer.begin_episode(task, 0)
        ep.append_step({"t": 0, "actions": np.zeros((50, 7), np.float32)})
        ep.finish({"success": False, "total_steps": 5})


SETUP_ERROR_CASES = {
    # name: (CollectionArgs overrides, how to prepare output_dir, expected message fragments, policy load reached)
    "unknown suite": (
        {"task_suite": "libero_100"},
        None,
        ["Unknown LIBERO suite 'libero_100'", "libero_spatial, libero_object, libero_goal, libero_10, libero_90"],
        False,
    ),
    "task id out of range": ({"task_ids": (10,)}, None, ["task_id 10 is out of range", "0..9"], False),
    "negative task id": ({"task_ids": (-1,)}, None, ["task_id -1 is out of range", "0..9"], False),
    "too many episodes": ({"episodes_per_task": 51}, None, ["exceeds the 50 initial states", "1..50"], False),
    "capture layer": (
        {"capture": CaptureSpec(layers=(0, 4))},
        None,
        ["Capture layer(s) [4] do not exist", "4 layers", "0..3"],
        False,
    ),
    "capture denoise step": (
        {"capture": CaptureSpec(denoise_steps=(10,))},
        None,
        ["denoising step(s) [10] do not exist", "0..9"],
        False,
    ),
    "unwritable output": ({"output_dir": pathlib.Path("/proc/latents_run")}, None, ["not writable"], False),
    "output under a file": ({}, "under_file", ["is not a directory", "--output-dir"], False),
    "existing store without resume": ({}, "store", ["already holds 1 episode", "--resume"], False),
    "non-empty non-store dir": ({}, "other_files", ["is not empty and is not a latent store"], False),
    "existing pickle without resume": (
        {"output_format": "pickle"},
        "pickle",
        ["already holds tasks [0]", "--resume"],
        False,
    ),
    "missing checkpoint": ({"checkpoint": "MISSING"}, None, ["not found", "params/ and assets/"], True),
    "checkpoint without params": ({"checkpoint": "NO_PARAMS"}, None, ["has no params/ subdirectory"], True),
    "missing norm stats": (
        {"checkpoint": str(TINY_CHECKPOINT)},
        None,
        ["No norm stats for asset id 'pi0_libero_tiny'", "Asset ids in this checkpoint: 'test'", "Pass --asset-id"],
        True,
    ),
    "zero denoise steps": ({"num_denoise_steps": 0}, None, ["--num-denoise-steps must be >= 1", "got 0"], False),
    "zero queue size": ({"queue_size": 0}, None, ["--queue-size must be >= 1", "got 0"], False),
    "teacher forcing without a counterfactual": (
        {"counterfactual_teacher_forced": True},
        None,
        ["--counterfactual-teacher-forced reruns each counterfactual inference", "add --counterfactual blank"],
        False,
    ),
    "dangling symlink output": ({}, "dangling_symlink", ["is a symbolic link to", "which does not exist"], False),
    "resume with a damaged finished episode": (
        {"resume": True},
        "damaged_store",
        ["Cannot resume: these episodes are damaged and may hold finished episodes", "commit.json"],
        False,
    ),
    "full disk": ({}, "full_disk", ["No space left for --output-dir", "0 B free", "Free some space"], False),
}


@pytest.mark.parametrize("case", list(SETUP_ERROR_CASES))
def test_setup_errors_exit_2_before_any_rollout_and_write_nothing(case, tmp_path, monkeypatch, capsys):
    overrides, prepare, fragments, loads_policy = SETUP_ERROR_CASES[case]
    out = tmp_path / "out"
    if prepare == "store":
        _write_store_with_one_episode(out)
    elif prepare == "other_files":
        out.mkdir()
        (out / "notes.txt").write_text("not a store")
    elif prepare == "pickle":
        (out / "inference_latents").mkdir(parents=True)
        (out / "inference_latents" / f"task_0_{TASK_NAME}.pkl").write_bytes(b"")
    elif prepare == "under_file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "out"
    elif prepare == "dangling_symlink":
        out.symlink_to(tmp_path / "deleted_target")
    elif prepare == "damaged_store":
        _write_store_with_one_episode(out)
        (out / "task_000" / "episode_0" / "commit.json").write_text("{garbage")
    elif prepare == "full_disk":
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, 1 << 40, 0))
    if overrides.get("checkpoint") == "MISSING":
        overrides = {**overrides, "checkpoint": str(tmp_path / "no_such_checkpoint")}
    elif overrides.get("checkpoint") == "NO_PARAMS":
        (tmp_path / "ckpt" / "assets").mkdir(parents=True)
        overrides = {**overrides, "checkpoint": str(tmp_path / "ckpt")}
    overrides = {"output_dir": out, **overrides}
    args = tiny_args(**overrides)
    before = tree_snapshot(tmp_path)

    monkeypatch.setattr(L, "LiberoEnv", _NoEnv)
    policy_loads = []
    real_create = policy_config.create_trained_policy

    def spy_create(*a, **k):
        policy_loads.append(a)
        return real_create(*a, **k)

    monkeypatch.setattr(policy_config, "create_trained_policy", spy_create)
    script = _load_script()
    start = time.monotonic()
    with pytest.raises(SystemExit) as info:
        script.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    # The error ends the output (INFO lines such as "Loading policy" may come before it; it may span lines).
    assert "\nerror: " in "\n" + err and "Traceback" not in err
    assert not [line for line in err[err.rindex("error: ") :].splitlines() if line.startswith(("INFO", "WARNING"))]
    assert "asset_id=" not in err and "checkpoint_dir=" not in err  # the flags the user types, not Python names
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert len(policy_loads) == int(loads_policy)  # output checks come before the (slow) policy load
    assert tree_snapshot(tmp_path) == before, "a failed setup wrote something"
    assert time.monotonic() - start < 30


def test_setup_error_type_and_cause():
    with pytest.raises(collection.SetupError, match="valid suites") as info:
        collection.collect(tiny_args(pathlib.Path("/nonexistent/x"), task_suite="nope"))
    assert isinstance(info.value, ValueError) and isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--task-suite", "libero_100"], ["valid suites: libero_spatial, libero_object, libero_goal"]),
        (["--capture.layers", "0", "7"], ["Capture layer(s) [7] do not exist", "valid indices 0..3"]),
    ],
)
def test_cli_setup_errors(tmp_path, extra, fragments, load_script, capsys):
    """The CLI's parsing (tyro, the script's own argument type) and main, in-process: exit code 2, the message, no
    traceback, no output, seconds not minutes."""
    out = tmp_path / "out"
    start = time.monotonic()
    args = tyro.cli(collection.CollectionArgs, args=cli_args(out, *extra))
    with pytest.raises(SystemExit) as info:
        load_script("inference_latent_collection").main(args, [str(SCRIPT), *cli_args(out, *extra)])
    captured = capsys.readouterr()
    assert info.value.code == 2, captured.err
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in captured.err
    assert "Capture per inference" not in captured.out  # printed once the policy is loaded
    assert not out.exists()
    assert time.monotonic() - start < 60


def test_cli_logs_info_lines_and_names_flags(tmp_path):
    """openpi's INFO lines print although absl (via orbax) configured logging at import; a library's fix is worded as
    the flag the user typed (--asset-id, not asset_id=...)."""
    proc = cli(*cli_args(tmp_path / "out", "--checkpoint", str(TINY_CHECKPOINT)), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "INFO openpi.latents.collect.policy: Loading policy pi0_libero_tiny" in proc.stderr
    assert "Pass --asset-id with one of them." in proc.stderr and "asset_id=" not in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_on_signal_defers_during_rollouts_and_raises_at_once_otherwise(signum):
    def deliver() -> None:
        os.kill(os.getpid(), signum)
        for _ in range(200):  # Python runs the handler in the main thread between bytecodes
            time.sleep(0.005)

    before = signal.getsignal(signum)
    with collection.StopOnSignal() as stop:
        with pytest.raises(collection.Interrupted) as info:  # setup: at once
            deliver()
        assert info.value.exit_code == 128 + signum and info.value.signal_name == signum.name
        stop.deferring = True  # rollouts: only a request...
        deliver()
        assert stop.requested == signum
        with pytest.raises(collection.Interrupted):  # ...acted on at the next step boundary
            stop.check()
        with pytest.raises(collection.Interrupted):  # a second signal: at once
            deliver()
    assert signal.getsignal(signum) is before


def test_resume_command_repeats_the_arguments_with_resume():
    script = _load_script()
    argv = ["scripts/inference_latent_collection.py", "--output-dir", "my out", "--no-resume", "--task-ids", "0"]
    command = script.resume_command(argv)
    assert shlex.split(command) == [sys.executable, *argv[:3], "--task-ids", "0", "--resume"]
    assert shlex.split(script.resume_command([*argv[:3], "--resume"])).count("--resume") == 1


def test_free_space_warning_and_collect_prints_it(tmp_path, monkeypatch, capsys):
    from openpi.latents.recording import disk

    free = shutil.disk_usage(tmp_path).free
    assert disk.free_space_warning(tmp_path / "new" / "out", 0) is None
    warning = disk.free_space_warning(tmp_path / "new" / "out", free + (1 << 30))
    assert warning is not None and f"filesystem of {tmp_path}" in warning and "--output-dir" in warning

    # collect() warns after the size estimate (about 1.9 MB here: 4 inferences), before the first env.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 40, 1 << 40, 3 << 19))
    monkeypatch.setattr(L, "LiberoEnv", _NoEnv)
    policy = policy_config.create_trained_policy("pi0_libero_tiny", sample_kwargs={"num_steps": NUM_DENOISE_STEPS})
    with pytest.raises(AssertionError, match="a LIBERO env was created"):
        collection.collect(tiny_args(tmp_path / "out"), policy=policy)
    err = capsys.readouterr().err
    assert "warning: the estimated size" in err and "exceeds the 1.6 MB free" in err


# ---------------------------------------------------------------------------------------------------------------------
# One real run shared by the structure, success, counterfactual and video tests.


@pytest.fixture(scope="module")
def tiny_policy():
    return policy_config.create_trained_policy(
        "pi0_libero_tiny", sample_kwargs={"num_steps": NUM_DENOISE_STEPS}, rng_seed=L.DEFAULT_SEED
    )


class _TrackedEnv(L.LiberoEnv):
    """The real LiberoEnv, remembering the instances created (so the test policy can reach the sim)."""

    created: ClassVar[list[L.LiberoEnv]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _TrackedEnv.created.append(self)


class _DrawerOpeningPolicy:
    """The real tiny policy; at its `at`-th inference with the task's own prompt (counting across the run, so only in
    the first episode) it puts the middle drawer's joint into LIBERO's "open" range through the sim. Counterfactual
    reruns (other prompts) pass through untouched."""

    def __init__(self, policy, at: int = 2):
        self._policy = policy
        self.at = at
        self.calls = 0

    @property
    def model(self):
        return self._policy.model

    def infer_with_latents(self, obs, **kwargs):
        if obs["prompt"] == PROMPT:
            self.calls += 1
            if self.calls == self.at:
                inner = _TrackedEnv.created[-1].raw.env  # the robosuite env
                cabinet = inner.get_object("wooden_cabinet_1")
                (joint,) = inner.object_sites_dict["wooden_cabinet_1_middle_region"].joints
                lo, hi = cabinet.object_properties["articulation"]["default_open_ranges"]
                inner.sim.data.set_joint_qpos(joint, (lo + hi) / 2)
                inner.sim.forward()
        return self._policy.infer_with_latents(obs, **kwargs)


@dataclasses.dataclass
class GoalRun:
    root: pathlib.Path
    args: collection.CollectionArgs
    outcomes: list[collection.EpisodeOutcome]
    stdout: str
    stderr: str
    wall_s: float


@pytest.fixture(scope="module")
def goal_run(tmp_path_factory, tiny_policy) -> GoalRun:
    """libero_goal task 0, 2 episodes of at most 20 steps, blank-prompt counterfactual at every 2nd inference, videos.

    Episode 0: the drawer is opened at its 2nd inference (t=5) -> LIBERO's done at env step 6. Episode 1: runs out.
    """
    root = tmp_path_factory.mktemp("goal_run") / "store"
    args = tiny_args(root, episodes_per_task=2, counterfactual="blank", counterfactual_every=2, save_videos=True)
    out, err = io.StringIO(), io.StringIO()
    _TrackedEnv.created.clear()
    start = time.monotonic()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(L, "LiberoEnv", _TrackedEnv)
        outcomes = collection.collect(args, policy=_DrawerOpeningPolicy(tiny_policy))
    assert len(_TrackedEnv.created) == 1  # one env for the task, reused across its episodes
    return GoalRun(root, args, outcomes, out.getvalue(), err.getvalue(), time.monotonic() - start)


@pytest.mark.libero
def test_success_labelled_from_libero_done_end_to_end(goal_run):
    data = store.load_inference_task_data(goal_run.root, TASK_ID)
    m0 = data["episodes"]["episode_0"]["metadata"]
    m1 = data["episodes"]["episode_1"]["metadata"]
    # Episode 0: done at the env step taken at t=5 (the 6th step).
    assert (m0["success"], m0["total_steps"], m0["num_inferences"], m0["error"]) == (True, 6, 2, None)
    assert list(data["episodes"]["episode_0"]["rollout_steps"]) == ["step_0", "step_5"]
    # Episode 1: the random policy runs out of steps.
    assert (m1["success"], m1["total_steps"], m1["num_inferences"], m1["error"]) == (False, 20, 4, None)
    # What collect returns, the progress bar's running rate and the closing table agree.
    assert [(o.task_id, o.episode_index, o.success, o.total_steps, o.error, o.skipped) for o in goal_run.outcomes] == [
        (0, 0, True, 6, None, False),
        (0, 1, False, 20, None, False),
    ]
    assert "success=1/1 (100%)" in goal_run.stderr and "success=1/2 (50%)" in goal_run.stderr
    table = collection.summary_table(collection.make_plan(goal_run.args), goal_run.outcomes).splitlines()
    assert table[1].split()[0] == "0" and table[1].split()[-4:] == ["2", "1", "50.0%", "0"]
    assert table[-1].split()[-3:] == ["2", "1", "50.0%"]


@pytest.mark.libero
def test_stored_structure_shapes_dtypes_and_metadata(goal_run, tiny_policy):
    config = tiny_policy.model.config
    fields = expected_fields(config)
    manifest = json.loads((goal_run.root / "manifest.json").read_text())
    assert manifest["capture_spec"] == CaptureSpec().to_dict()
    assert manifest["arguments"]["task_suite"] == SUITE and manifest["arguments"]["counterfactual"] == "blank"
    assert manifest["preset"] == "pi0_libero_tiny" and manifest["checkpoint"] == "random(seed=0)"
    assert manifest["max_steps"] == 20 and manifest["segment_names"] == list(config.segment_names)
    assert manifest["content_hash"].startswith("sha256:") and manifest["code_version"]
    assert "Capture per inference:" in goal_run.stdout and "Estimated size" in goal_run.stdout

    data = store.load_inference_task_data(goal_run.root, TASK_ID)
    assert (data["task_id"], data["task_name"], data["suite"], data["language"]) == (TASK_ID, TASK_NAME, SUITE, PROMPT)
    assert list(data["episodes"]) == ["episode_0", "episode_1"]
    for k, n_steps in [(0, 2), (1, 4)]:
        episode = data["episodes"][f"episode_{k}"]
        meta = episode["metadata"]
        for key in ("success", "total_steps", "error", "wall_time_s", "num_inferences", "init_state_index", "seed",
                    "prompt", "max_steps", "counterfactual_prompt", "complete", "committed_steps"):  # fmt: skip
            assert key in meta, key
        assert (meta["init_state_index"], meta["seed"], meta["prompt"], meta["max_steps"]) == (k, 7, PROMPT, 20)
        assert meta["complete"] is True and meta["committed_steps"] == n_steps == meta["num_inferences"]
        assert meta["counterfactual_prompt"] == "" and 0 < meta["wall_time_s"] < 600
        steps = episode["rollout_steps"]
        assert list(steps) == [f"step_{5 * i}" for i in range(n_steps)]  # env timestep t after the wait steps
        noises = episode_noise(k, n_steps, config)
        for i, name in enumerate(steps):
            step = steps[name]
            cf_here = i % 2 == 0
            assert set(step) == set(fields) | (CF_KEYS if cf_here else set()), name
            for key in step:
                check_field(step[key], key, fields)
            assert step["t"] == 5 * i and step["prompt"] == PROMPT
            np.testing.assert_array_equal(step["executed_actions"], step["actions"][:5])
            assert np.isfinite(step["actions"]).all() and np.abs(step["actions"]).max() > 0
            # The noise is the documented per-episode draw; the trajectory starts at it and ends at the model output.
            np.testing.assert_array_equal(step["noise"], noises[i])
            np.testing.assert_array_equal(step["x_t"][0, 0], step["noise"])
            np.testing.assert_array_equal(step["x_t"][-1, 0], step["model_actions"])
            np.testing.assert_allclose(step["denoise_times"], 1.0 - np.arange(NUM_DENOISE_STEPS) / 10, atol=1e-6)
            mask, tokens = step["text_mask"][0], step["tokenized_prompt"][0]
            assert 0 < mask.sum() < len(mask) and mask[: mask.sum()].all() and (tokens[~mask] == 0).all()
            for image_key in ("image", "wrist_image"):
                assert step[image_key].std() > 10, f"{name} {image_key} looks blank"
            assert not np.array_equal(step["image"], step["wrist_image"])
        # The robot moved: state and view change over the episode.
        first, last = steps["step_0"], steps[f"step_{5 * (n_steps - 1)}"]
        assert not np.array_equal(first["state"], last["state"])
        assert not np.array_equal(first["image"], last["image"])


@pytest.mark.libero
def test_stored_record_reproduces_under_the_policy(goal_run, tiny_policy):
    """The stored images, state, prompt and noise give back the stored actions and latents (bit for bit), and the
    counterfactual's stored prompt gives back the cf_* values: the record is the inference that was executed."""
    step = store.load_inference_task_data(goal_run.root, TASK_ID)["episodes"]["episode_1"]["rollout_steps"]["step_10"]
    element = {
        "observation/image": step["image"],
        "observation/wrist_image": step["wrist_image"],
        "observation/state": step["state"],
    }
    for prefix, prompt in [("", PROMPT), ("cf_", "")]:
        obs = {**element, "prompt": prompt}
        result = tiny_policy.infer_with_latents(obs, noise=step["noise"], capture=CaptureSpec())
        assert_same(np.asarray(result["actions"], np.float32), step[f"{prefix}actions"], f"{prefix}actions")
        assert_same(result["model_actions"], step[f"{prefix}model_actions"], f"{prefix}model_actions")
        for key in LATENT_KEYS:
            assert_same(result["latents"][key], step[f"{prefix}{key}"], f"{prefix}{key}")


@pytest.mark.libero
def test_blank_counterfactual_same_observation_and_noise(goal_run):
    reader = store.open_store(goal_run.root)
    assert reader.episode(TASK_ID, 1).present_steps("cf_actions") == [0, 2]  # every 2nd inference
    assert reader.episode(TASK_ID, 0).present_steps("cf_x_t") == [0]
    data = store.load_inference_task_data(goal_run.root, TASK_ID)
    segments = list(json.loads((goal_run.root / "manifest.json").read_text())["segment_names"])
    cams = [i for i, name in enumerate(segments) if name != "text"]
    for k, name in [(0, "step_0"), (1, "step_0"), (1, "step_10")]:
        step = data["episodes"][f"episode_{k}"]["rollout_steps"][name]
        assert step["cf_prompt"] == ""
        # A different (shorter) prompt, tokenized...
        assert step["cf_text_mask"].sum() < step["text_mask"].sum()
        assert not np.array_equal(step["cf_tokenized_prompt"], step["tokenized_prompt"])
        # ...on the same noise...
        np.testing.assert_array_equal(step["cf_x_t"][0], step["x_t"][0])
        # ...and the same observation: the image tokens entering layer 0 (embeddings) are bit-identical.
        assert_same(step["cf_expert_0_segment_means"][0, :, cams], step["expert_0_segment_means"][0, :, cams], name)
        assert step["cf_actions"].shape == step["actions"].shape and np.isfinite(step["cf_actions"]).all()


@pytest.mark.libero
def test_videos_one_per_episode_named_by_outcome(goal_run):
    import imageio.v3 as iio

    videos = sorted(p.name for p in (goal_run.root / "videos").iterdir())
    assert videos == ["task000_ep000_success.mp4", "task000_ep001_failure.mp4"]
    frames = iio.imread(goal_run.root / "videos" / "task000_ep000_success.mp4")
    assert frames.shape[0] == 6 + 1 and frames.shape[-1] == 3  # the view after the wait steps + one per env step
    # The store still opens and lists only its episodes.
    assert store.completed_episodes(goal_run.root) == {(0, 0), (0, 1)}


@pytest.mark.libero
def test_export_pickle_equals_the_store(goal_run, tmp_path):
    (path,) = store.export_pickle(goal_run.root, tmp_path)
    assert path == tmp_path / "inference_latents" / f"task_0_{TASK_NAME}.pkl"
    with pytest.raises(PermissionError, match="allow_pickle"):
        store.load_inference_task_data(tmp_path, TASK_ID)
    exported = store.load_inference_task_data(tmp_path, TASK_ID, allow_pickle=True)
    lazy = store.load_inference_task_data(goal_run.root, TASK_ID)
    assert {k: exported[k] for k in ("task_id", "task_name", "suite", "language")} == {
        k: lazy[k] for k in ("task_id", "task_name", "suite", "language")
    }
    assert list(exported["episodes"]) == list(lazy["episodes"])
    n_values = 0
    for ep_name, episode in lazy["episodes"].items():
        assert exported["episodes"][ep_name]["metadata"] == episode["metadata"]
        assert list(exported["episodes"][ep_name]["rollout_steps"]) == list(episode["rollout_steps"])
        for step_name, step in episode["rollout_steps"].items():
            other = exported["episodes"][ep_name]["rollout_steps"][step_name]
            assert set(other) == set(step)
            for key in step:
                assert_same(other[key], step[key], f"{ep_name} {step_name} {key}")
                n_values += 1
    assert n_values > 100


# ---------------------------------------------------------------------------------------------------------------------
# --output-format pickle with the other-task counterfactual (a second short real run).


@pytest.mark.libero
def test_pickle_output_other_task_counterfactual_and_resume(goal_run, tiny_policy, tmp_path, monkeypatch):
    args = tiny_args(tmp_path, output_format="pickle", counterfactual="other-task", max_steps=10)
    outcomes = collection.collect(args, policy=tiny_policy)
    assert [(o.episode_index, o.success, o.total_steps, o.skipped) for o in outcomes] == [(0, False, 10, False)]
    path = tmp_path / "inference_latents" / f"task_0_{TASK_NAME}.pkl"
    assert sorted(p.name for p in (tmp_path / "inference_latents").iterdir()) == [path.name]
    data = store.load_inference_task_data(path, TASK_ID, allow_pickle=True)
    assert (data["task_id"], data["task_name"], data["suite"], data["language"]) == (TASK_ID, TASK_NAME, SUITE, PROMPT)
    man = data["manifest"]  # the run manifest travels with the pickle (layer ids, cameras for the analysis)
    assert CaptureSpec.from_dict(man["capture_spec"]) == args.capture and man["content_hash"].startswith("sha256:")
    assert man["segment_names"] == list(tiny_policy.model.config.segment_names)
    episode = data["episodes"]["episode_0"]
    meta = episode["metadata"]
    from openpi.latents.collect.args import other_task_draw

    drawn = other_task_draw(args.seed, TASK_ID, 0, len(L.list_tasks(SUITE)))  # random per episode, from the seed
    other_prompt = L.get_task(SUITE, drawn).language
    assert drawn != TASK_ID
    assert (meta["success"], meta["total_steps"], meta["num_inferences"], meta["complete"]) == (False, 10, 2, True)
    assert meta["counterfactual_prompt"] == other_prompt != PROMPT
    fields = expected_fields(tiny_policy.model.config)
    assert list(episode["rollout_steps"]) == ["step_0", "step_5"]
    zarr_steps = store.load_inference_task_data(goal_run.root, TASK_ID)["episodes"]["episode_0"]["rollout_steps"]
    for name, step in episode["rollout_steps"].items():
        assert set(step) == set(fields) | CF_KEYS  # counterfactual at every inference (default every 1)
        for key, value in step.items():
            check_field(value, key, fields)
        assert step["cf_prompt"] == other_prompt
        assert not np.array_equal(step["cf_tokenized_prompt"], step["tokenized_prompt"])
        np.testing.assert_array_equal(step["cf_x_t"][0], step["x_t"][0])
        # Same episode (initial state 0, its noise) as episode 0 of the zarr run, whose drawer trick acts only after
        # the observation at t=5: identical records, whatever the format.
        for key in fields:
            assert_same(step[key], zarr_steps[name][key], f"{name} {key}")

    # Resume: the episode is complete, nothing runs (no env is created), the outcome comes from the file.
    monkeypatch.setattr(L, "LiberoEnv", _NoEnv)
    before = tree_snapshot(tmp_path)
    again = collection.collect(dataclasses.replace(args, resume=True), policy=tiny_policy)
    assert [(o.episode_index, o.success, o.total_steps, o.skipped) for o in again] == [(0, False, 10, True)]
    assert tree_snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------------
# SIGKILL in the middle of an episode, then --resume.


def _episode_attrs(path: pathlib.Path) -> dict | None:
    try:
        return json.loads((path / "commit.json").read_text())  # the episode's commit record (store/commit.py)
    except (FileNotFoundError, ValueError, KeyError):
        return None


@pytest.mark.libero
@pytest.mark.timeout(400)
def test_sigkill_mid_episode_then_resume_runs_each_episode_once(tmp_path):
    root = tmp_path / "store"
    ep1 = root / "task_000" / "episode_1"
    max_steps, n_inferences = 30, math.ceil(30 / 5)
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *cli_args(root, "--episodes-per-task", "2", "--max-steps", str(max_steps))],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    killed_at = sigkill_once_committed(proc, lambda: (_episode_attrs(ep1) or {}).get("committed_steps"), "episode 1")

    # Episode 0 is intact and complete; the partial episode 1 is not presented as complete.
    data = store.load_inference_task_data(root, TASK_ID)
    assert list(data["episodes"]) == ["episode_0"]
    ep0 = data["episodes"]["episode_0"]
    assert ep0["metadata"]["complete"] is True and ep0["metadata"]["total_steps"] == max_steps
    assert list(ep0["rollout_steps"]) == [f"step_{5 * i}" for i in range(n_inferences)]
    for name, step in ep0["rollout_steps"].items():
        for key in step:
            value = step[key]
            assert isinstance(value, str) or np.all(np.isfinite(np.asarray(value, np.float64))), f"{name} {key}"
        assert step["image"].std() > 10
    partial = store.load_inference_task_data(root, TASK_ID, include_incomplete=True)["episodes"]["episode_1"]
    committed = partial["metadata"]["committed_steps"]
    assert partial["metadata"]["complete"] is False and 1 <= killed_at <= committed < n_inferences
    assert "success" not in partial["metadata"]
    assert list(partial["rollout_steps"]) == [f"step_{5 * i}" for i in range(committed)]
    partial_step0 = {k: partial["rollout_steps"]["step_0"][k] for k in ("noise", "state", "image", "actions")}
    ep0_attrs = (root / "task_000" / "episode_0" / "zarr.json").read_text()

    # Without --resume: refused. With --resume but other settings: refused, naming the field, deleting nothing.
    before = tree_snapshot(root)
    refused = cli(*cli_args(root, "--episodes-per-task", "2", "--max-steps", str(max_steps)), timeout=120)
    assert refused.returncode == 2 and "already holds 2 episodes; pass --resume" in refused.stderr
    changed = cli(*cli_args(root, "--episodes-per-task", "2", "--max-steps", "40", "--resume"), timeout=120)
    assert changed.returncode == 2 and "Cannot resume" in changed.stderr and "max_steps" in changed.stderr
    # The killed run's writer lock is recognised as stale and taken over only when asked.
    locked = cli(*cli_args(root, "--episodes-per-task", "2", "--max-steps", str(max_steps), "--resume"), timeout=120)
    assert locked.returncode == 2 and "stale writer lock" in locked.stderr and "--break-stale-lock" in locked.stderr
    assert tree_snapshot(root) == before

    resumed = cli(
        *cli_args(root, "--episodes-per-task", "2", "--max-steps", str(max_steps), "--resume", "--break-stale-lock")
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Resuming: 1 episodes already complete, 1 to run." in resumed.stdout
    # openpi's INFO lines print (absl configures logging when orbax is imported; the CLI overrides it).
    assert "Resume: deleted 1 incomplete episodes" in resumed.stderr
    assert "Replaying 1 env resets for episode 1." in resumed.stderr
    assert f"task 0 episode 1: failure after {max_steps} steps" in resumed.stderr
    (total,) = [line for line in resumed.stdout.splitlines() if "Total success rate" in line]
    assert total.split()[-3:] == ["2", "0", "0.0%"]  # the closing table counts both episodes

    # Each episode exactly once, both complete; episode 0 untouched; episode 1 re-run from scratch, identically.
    assert sorted(p.name for p in (root / "task_000").iterdir() if p.is_dir()) == ["episode_0", "episode_1"]
    assert (root / "task_000" / "episode_0" / "zarr.json").read_text() == ep0_attrs
    data = store.load_inference_task_data(root, TASK_ID)
    assert list(data["episodes"]) == ["episode_0", "episode_1"]
    ep1_data = data["episodes"]["episode_1"]
    meta = ep1_data["metadata"]
    assert (meta["complete"], meta["total_steps"], meta["num_inferences"], meta["success"]) == (
        True, max_steps, n_inferences, False,
    )  # fmt: skip
    assert list(ep1_data["rollout_steps"]) == [f"step_{5 * i}" for i in range(n_inferences)]
    # The image matches only because the resumed run replays episode 0's env reset (LIBERO re-places fixtures).
    for key, value in partial_step0.items():
        np.testing.assert_array_equal(ep1_data["rollout_steps"]["step_0"][key], value, err_msg=key)
    resumes = json.loads((root / "zarr.json").read_text())["attributes"]["resumes"]
    assert [r["deleted_incomplete"] for r in resumes] == [[[0, 1]]]


# ---------------------------------------------------------------------------------------------------------------------
# SIGINT, then SIGTERM of the printed resume command: a clean stop, a hint to resume, exit 128 + signal.


def _wait_for_step(proc: subprocess.Popen, episode: pathlib.Path, log: pathlib.Path, after: str = "") -> None:
    """Until `episode` has a committed step (once `after` is in the log); fails if the run ends first."""
    deadline = time.monotonic() + 300
    while not (after in log.read_text() and (_episode_attrs(episode) or {}).get("committed_steps", 0) >= 1):
        assert proc.poll() is None, f"the run ended before the signal:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no step was committed"
        time.sleep(0.05)


@pytest.mark.libero
@pytest.mark.timeout(400)
def test_sigint_and_sigterm_stop_cleanly_and_print_the_resume_command(tmp_path):
    root, log = tmp_path / "store", tmp_path / "log.txt"
    episode = root / "task_000" / "episode_0"
    command = [sys.executable, str(SCRIPT), *cli_args(root, "--max-steps", "30", "--num-denoise-steps", "2")]
    n_inferences = 6
    for signum, after in [(signal.SIGINT, ""), (signal.SIGTERM, "Resume: deleted 1 incomplete episodes")]:
        with log.open("w") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
            try:
                _wait_for_step(proc, episode, log, after)
                proc.send_signal(signum)
                proc.wait(timeout=120)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        text = log.read_text()
        assert proc.returncode == 128 + signum, text[-3000:]
        assert "Traceback" not in text and f"Stopped by {signum.name}." in text
        # The stop waited for the inference in flight: every committed step is complete and readable.
        partial = store.load_inference_task_data(root, TASK_ID, include_incomplete=True)["episodes"]["episode_0"]
        committed = partial["metadata"]["committed_steps"]
        assert partial["metadata"]["complete"] is False and 1 <= committed < n_inferences
        for name, step in partial["rollout_steps"].items():
            assert np.isfinite(step["actions"]).all() and step["image"].std() > 10, name
        # The hint is the command that continues this run (the next round runs it).
        hint = text.split("Resume with:\n", 1)[1].strip().splitlines()[0]
        command = shlex.split(hint)
        want = cli_args(root, "--max-steps", "30", "--num-denoise-steps", "2")
        assert command == [sys.executable, str(SCRIPT), *want, "--resume"]
