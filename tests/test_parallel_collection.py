"""Parallel collection on the REAL LIBERO simulator: ``--num-envs N`` (env worker processes, batched inference) and
``--backend ray`` (a local Ray cluster), against the sequential run.

Tiny random-weight preset, libero_goal task 0, 2 episodes of 20 env steps (4 inferences each), 2 denoising steps. The
sequential store (module fixture) is the reference: with one observation per model call the parallel runs must store
every array and metadata field bit for bit (wall times aside). Episode 1 runs in a second env worker, which first
replays episode 0's env reset, so the equality also shows that replaying resets gives episode k its scene.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import ml_dtypes
import numpy as np
import pytest

from openpi.latents import collect as collection
from openpi.latents import store
from openpi.latents.collect import parallel
from openpi.latents.store import shared
from openpi.latents.store.commit import read_commit
from openpi.latents.store.lock import read_holder

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning"),
]

SUITE, TASK_ID, EPISODES = "libero_goal", 0, 2
# Batched vs one observation per call (tests/test_batching.py measures them): the tiny model runs in float32; the
# hidden states are captured in bfloat16 (compared relative to each key's largest magnitude).
ACTION_TOLERANCE, LATENT_RELATIVE_TOLERANCE = 2e-5, 2**-5
HAS_RAY = importlib.util.find_spec("ray") is not None
REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_args(output_dir: pathlib.Path, **overrides) -> collection.CollectionArgs:
    base = dict(
        preset="pi0_libero_tiny",
        task_suite=SUITE,
        task_ids=(TASK_ID,),
        episodes_per_task=EPISODES,
        max_steps=20,
        num_denoise_steps=2,
    )
    return collection.CollectionArgs(output_dir=output_dir, **{**base, **overrides})


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("sequential") / "store"
    collection.collect(tiny_args(root))
    return root


def _episode(root: pathlib.Path, k: int):
    return store.open_store(root).episode(TASK_ID, k)


def _as_bits(value: np.ndarray) -> np.ndarray:
    return value.view(np.uint16) if value.dtype == ml_dtypes.bfloat16 else value


def assert_same_store(actual: pathlib.Path, expected: pathlib.Path) -> None:
    """Every episode's metadata (wall time aside), keys and arrays equal bit for bit."""
    assert store.open_store(actual).completed_episodes() == store.open_store(expected).completed_episodes()
    for k in range(EPISODES):
        a, e = _episode(actual, k), _episode(expected, k)
        meta_a, meta_e = dict(a.metadata), dict(e.metadata)
        assert meta_a.pop("wall_time_s") >= 0 and meta_e.pop("wall_time_s") >= 0
        assert meta_a == meta_e, k
        assert sorted(a.keys()) == sorted(e.keys())
        for key in e.keys():
            va, ve = a.read(key), e.read(key)
            assert va.dtype == ve.dtype and va.shape == ve.shape, (k, key)
            np.testing.assert_array_equal(_as_bits(va), _as_bits(ve), err_msg=f"episode {k} {key}")


def test_split_work_blocks_are_contiguous_and_cover_the_todo():
    tasks = tuple(collection.make_plan(tiny_args(pathlib.Path("/unused"), task_ids=(0, 1, 2))).tasks)
    units = parallel.split_work(tasks, {0: [0, 1, 2, 3, 4], 1: [2, 3], 2: []}, num_envs=4)
    covered = sorted((u.task.task_id, k) for u in units for k in u.episodes)
    assert covered == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3)]
    for u in units:  # contiguous and ascending: a block replays only the resets before its first episode
        assert list(u.episodes) == list(range(u.episodes[0], u.episodes[-1] + 1))
    assert len(units) == 4  # 2 tasks with work, 4 envs: each task cut in two
    assert parallel.split_work(tasks, {0: [0, 1], 1: [0], 2: [5]}, num_envs=2) == [
        parallel.WorkUnit(tasks[0], (0, 1)),
        parallel.WorkUnit(tasks[1], (0,)),
        parallel.WorkUnit(tasks[2], (5,)),
    ]  # enough tasks: one unit each, no reset replay


@pytest.mark.libero
@pytest.mark.slow
def test_num_envs_without_batching_stores_what_the_sequential_run_stores(sequential, tmp_path):
    outcomes = collection.collect(tiny_args(tmp_path / "n2", num_envs=2, batch_inference=False))
    assert sorted(o.episode_index for o in outcomes) == list(range(EPISODES))
    assert_same_store(tmp_path / "n2", sequential)


@pytest.mark.libero
@pytest.mark.slow
def test_batched_inference_first_inference_within_tolerance(sequential, tmp_path):
    collection.collect(tiny_args(tmp_path / "batched", num_envs=2))
    for k in range(EPISODES):
        a, e = _episode(tmp_path / "batched", k), _episode(sequential, k)
        assert a.metadata["complete"] and a.metadata["num_inferences"] == e.metadata["num_inferences"]
        # The first inference sees the same scene and noise; only the batched model call's rounding differs.
        for key in ("t", "prompt", "noise", "state", "image", "wrist_image", "tokenized_prompt", "text_mask"):
            np.testing.assert_array_equal(a.read(key, steps=0), e.read(key, steps=0), err_msg=key)
        for key in ("actions", "model_actions", "x_t"):
            np.testing.assert_allclose(a.read(key, steps=0), e.read(key, steps=0), atol=ACTION_TOLERANCE, rtol=0)
        for key in ("expert_0_segment_means", "expert_1_segment_means", "text_only_hidden_states"):
            va, ve = (np.asarray(x.read(key, steps=0), np.float64) for x in (a, e))
            assert np.abs(va - ve).max() <= LATENT_RELATIVE_TOLERANCE * np.abs(ve).max(), key


@pytest.mark.libero
@pytest.mark.slow
def test_condition_runs_in_parallel_as_in_the_sequential_loop(tmp_path):
    """A condition (another task's prompt + an expert-1 text knockout) with --num-envs 2 and batching on: the workers
    get the condition's prompt, and inferences with an intervention are not batched, so the store equals the
    sequential condition run's bit for bit."""
    condition = collection.ConditionArgs(prompt="other-task", intervention="knockout-text-expert1", layers=(1,))
    collection.collect(tiny_args(tmp_path / "seq", condition=condition))
    collection.collect(tiny_args(tmp_path / "n2", condition=condition, num_envs=2))
    assert_same_store(tmp_path / "n2", tmp_path / "seq")
    other = collection.make_plan(tiny_args(tmp_path / "x", task_ids=(TASK_ID + 1,))).tasks[0].language
    ep = _episode(tmp_path / "n2", 0)
    assert ep.metadata["condition"]["name"] == "other-task+1+knockout-text-expert1@L1"
    assert {str(p) for p in ep.read("prompt")} == {other}  # every inference saw the other task's instruction


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"num_envs": 3}, ["--num-envs 3 exceeds the work", "2 episodes", "Lower --num-envs to 2"]),
        ({"num_envs": 0}, ["--num-envs must be >= 1"]),
        ({"num_envs": 2, "output_format": "pickle"}, ["use --output-format zarr"]),
        ({"ray_address": "127.0.0.1:1"}, ["--ray-address is only used with --backend ray"]),
    ],
)
def test_parallel_setup_errors(tmp_path, overrides, fragments):
    with pytest.raises(collection.SetupError) as e:
        collection.collect(tiny_args(tmp_path / "out", **overrides))
    for fragment in fragments:
        assert fragment in str(e.value)
    assert not (tmp_path / "out").exists()


def test_ray_missing_is_a_setup_error_naming_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(collection.SetupError, match=r"needs Ray.*uv sync --extra ray"):
        collection.collect(tiny_args(tmp_path / "out", backend="ray"))


@pytest.mark.skipif(not HAS_RAY, reason="the ray extra is not installed")
def test_unreachable_ray_address_is_a_setup_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(collection.SetupError, match=r"Ray cluster at '127.0.0.1:1' is unreachable"):
        collection.collect(tiny_args(tmp_path / "out", backend="ray", ray_address="127.0.0.1:1"))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Ray on a local cluster (2 CPUs: one policy worker at a time, each with one env worker).


@pytest.fixture(scope="module")
def local_ray():
    if not HAS_RAY:
        pytest.skip("the ray extra is not installed")
    from openpi.latents.collect.ray_backend import import_ray

    ray = import_ray()

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.mark.libero
@pytest.mark.slow
def test_ray_backend_stores_what_the_sequential_run_stores(local_ray, sequential, tmp_path):
    outcomes = collection.collect(tiny_args(tmp_path / "ray", backend="ray", batch_inference=False))
    assert sorted(o.episode_index for o in outcomes) == list(range(EPISODES))
    assert_same_store(tmp_path / "ray", sequential)
    assert not list((tmp_path / "ray" / shared.CLAIMS_DIR).iterdir())  # every claim released


def _kill_claim_holder_mid_episode(root: pathlib.Path, killed: list, stop: threading.Event) -> None:
    """Kills the Ray policy worker (the pid in an episode's claim) once that episode has committed a step."""
    while not stop.is_set() and not killed:
        for claim in (root / shared.CLAIMS_DIR).glob("*.claim") if (root / shared.CLAIMS_DIR).exists() else []:
            try:
                holder = read_holder(claim)
                k = int(claim.stem.rsplit("_", 1)[1])
                record = read_commit(root / f"task_{TASK_ID:03d}" / f"episode_{k}")[0]
            except Exception:
                continue
            if holder is not None and 1 <= record.committed_steps and not record.complete:
                import os

                os.kill(holder.pid, signal.SIGKILL)
                killed.append((k, holder.pid, record.committed_steps))
                return
        time.sleep(0.05)


@pytest.mark.libero
@pytest.mark.slow
def test_ray_worker_killed_mid_episode_reruns_it_once(local_ray, sequential, tmp_path):
    root = tmp_path / "ray_kill"
    killed: list = []
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_claim_holder_mid_episode, args=(root, killed, stop), daemon=True)
    watcher.start()
    try:
        outcomes = collection.collect(tiny_args(root, backend="ray", batch_inference=False))
    finally:
        stop.set()
        watcher.join()
    assert killed, "the watcher never saw an episode mid-way"
    # Each episode reported once and stored once, complete, with the sequential run's content.
    assert sorted(o.episode_index for o in outcomes) == list(range(EPISODES))
    assert_same_store(root, sequential)


@pytest.mark.libero
@pytest.mark.slow
def test_ray_resume_runs_only_the_missing_episodes(local_ray, sequential, tmp_path):
    root = tmp_path / "ray_resume"
    first = collection.collect(tiny_args(root, backend="ray", batch_inference=False, episodes_per_task=1))
    assert [o.episode_index for o in first] == [0]
    # A stale claim from a dead run is cleared by the driver; episode 1 is scheduled alone and replays one reset.
    (root / shared.CLAIMS_DIR).mkdir(exist_ok=True)
    (root / shared.CLAIMS_DIR / "task_0_episode_1.claim").write_text("{}")
    resumed = collection.collect(tiny_args(root, backend="ray", batch_inference=False, resume=True))
    assert sorted((o.episode_index, o.skipped) for o in resumed) == [(0, True), (1, False)]
    assert_same_store(root, sequential)


# --- issue 19 items 8 and 16: a hung env worker, a killed one, a killed coordinator ------------------------------------
def _env_worker_pids() -> list[int]:
    """This process's env worker children (``python -m openpi.envs.worker``), oldest first."""
    pids = []
    for proc in pathlib.Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"openpi.envs.worker" in (proc / "cmdline").read_bytes():
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    pids.append(int(proc.name))
        except OSError:
            continue
    return sorted(pids)


def _signal_first_worker_mid_episode_0(root: pathlib.Path, signum: int, done: list, stop: threading.Event) -> None:
    """Sends `signum` to the first env worker (it runs the first unit, episode 0) once episode 0 committed a step."""
    while not stop.is_set() and not done:
        try:
            record = read_commit(root / f"task_{TASK_ID:03d}" / "episode_0")[0]
        except Exception:
            record = None
        pids = _env_worker_pids()
        if record is not None and record.committed_steps >= 1 and not record.complete and pids:
            os.kill(pids[0], signum)
            done.append(pids[0])
            return
        time.sleep(0.02)


@contextlib.contextmanager
def _signalling_first_worker(root: pathlib.Path, signum: int):
    """Runs `_signal_first_worker_mid_episode_0` on a thread for the block; yields the list of signalled pids.
    Never leaves a stopped worker behind."""
    done: list = []
    stop = threading.Event()
    watcher = threading.Thread(target=_signal_first_worker_mid_episode_0, args=(root, signum, done, stop), daemon=True)
    watcher.start()
    try:
        yield done
    finally:
        stop.set()
        watcher.join()
        for pid in done if signum == signal.SIGSTOP else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.libero
def test_hung_env_worker_is_replaced_and_its_episode_rerun(sequential, tmp_path, caplog):
    root = tmp_path / "hang"
    with _signalling_first_worker(root, signal.SIGSTOP) as stopped:
        with caplog.at_level("WARNING", logger="openpi.latents.collect.parallel"):
            outcomes = collection.collect(tiny_args(root, num_envs=2, batch_inference=False, env_worker_timeout_s=15.0))
    assert stopped, "the watcher never saw episode 0 mid-way"
    assert f"env worker pid {stopped[0]} sent nothing for" in caplog.text and "episodes [0] again" in caplog.text
    assert sorted(o.episode_index for o in outcomes) == list(range(EPISODES))
    assert_same_store(root, sequential)  # the discarded, re-run episode equals the uninterrupted run's


@pytest.mark.libero
def test_sigkilled_env_worker_prints_the_resume_command(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("ilc", REPO / "scripts" / "inference_latent_collection.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root = tmp_path / "killed"
    argv = ["scripts/inference_latent_collection.py", "--num-envs", "2", "--output-dir", str(root)]
    with _signalling_first_worker(root, signal.SIGKILL) as killed, pytest.raises(SystemExit) as info:
        script.main(tiny_args(root, num_envs=2, batch_inference=False), argv=argv)
    err = capsys.readouterr().err
    assert killed and info.value.code == 1, err[-2000:]
    assert f"env worker pid {killed[0]} exited" in err and "Traceback" not in err
    assert "Resume with:" in err and err.rstrip().endswith("--resume")


def _running(pid: int) -> bool:
    """Whether `pid` exists and has not exited (a zombie waiting to be reaped has exited)."""
    try:
        return ") Z " not in pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False


def test_env_workers_exit_with_a_sigkilled_parent(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", "import time; from openpi.envs import worker as w; "
         "p = w.start(w.WorkerConfig('libero', 7, 20, 5, 10)); print(p.pid, flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    worker_pid = int(parent.stdout.readline())
    time.sleep(1.0)  # the worker is importing the simulator (seconds): before, it outlived its parent meanwhile
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 2.0
    while _running(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _running(worker_pid)
    if alive:
        os.kill(worker_pid, signal.SIGKILL)
    assert not alive, "the env worker outlived its SIGKILLed parent by more than 2 s"
