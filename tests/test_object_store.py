"""The latent store on object storage (``s3://``), against a real S3-compatible server on loopback.

moto's server mode (``moto.server.ThreadedMotoServer``) answers real S3 HTTP requests on 127.0.0.1 at a free port;
s3fs reaches it through ``AWS_ENDPOINT_URL`` (botocore's standard variable), with dummy credentials. No network.
What is checked: writing, reading and verifying a store there gives the same data as on disk; the commit protocol
(a killed writer's partial episode is hidden, then deleted by resume); the writer lock is exclusive (conditional PUT);
missing bucket / credentials / package give clear errors before anything is written; and the acceptance test, a
LIBERO collection into ``s3://`` SIGKILLed mid-episode, resumed, and read back by ``expert_data_utils`` and the
analysis CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("s3fs", reason="the s3 extra (uv sync --extra s3)")
moto_server = pytest.importorskip("moto.server", reason="moto[server] (dev group)")

from openpi.latents import store  # noqa: E402
from openpi.latents.store import location, verify  # noqa: E402
from openpi.latents.store.lock import ObjectLock, conditional_put_supported  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import store_kill_helper as helper  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "latents"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups for credentials
    "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
}


@pytest.fixture(scope="module")
def s3_endpoint():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """The environment of a process using the loopback server; a fresh, empty bucket per test."""
    for k, v in {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv(location.STORAGE_OPTIONS_ENV, raising=False)
    fs = location.ObjectPath("s3", BUCKET).fs
    if fs.exists(BUCKET):
        fs.rm(BUCKET, recursive=True)
    fs.mkdir(BUCKET)
    yield fs


def _write_store(root, n_episodes: int = 2) -> None:
    with store.LatentStoreWriter.create_or_open(root, helper.MANIFEST, resume=False, queue_size=2) as writer:
        for k in range(n_episodes):
            helper.write_episode(writer, k)


def _assert_episode_equal(a: store.EpisodeReader, b: store.EpisodeReader) -> None:
    def meta(ep):
        return {k: v for k, v in ep.metadata.items() if k != "wall_time_s"}

    assert meta(a) == meta(b) and a.step_t == b.step_t and a.keys() == b.keys()
    for key in a.keys():
        x, y = a.read(key), b.read(key)
        assert x.dtype == y.dtype and x.shape == y.shape, key
        if x.dtype.kind == "V" or str(x.dtype) == "bfloat16":
            x, y = x.view(np.uint16), y.view(np.uint16)
        np.testing.assert_array_equal(x, y, err_msg=key)


# ---------------------------------------------------------------------------------------------------------------------
# The store itself


@pytest.mark.slow
def test_write_read_verify_equal_to_the_local_store(s3, tmp_path):
    url = f"s3://{BUCKET}/runs/a"
    _write_store(url)
    _write_store(tmp_path / "local")
    objects = set(s3.find(f"{BUCKET}/runs/a"))
    assert f"{BUCKET}/runs/a/task_003/episode_1/commit.json" in objects
    assert f"{BUCKET}/runs/a/writer.lock" not in objects  # released by close()

    remote, local = store.open_store(url), store.open_store(tmp_path / "local")
    assert isinstance(remote.root, location.ObjectPath)
    same = {k: v for k, v in remote.manifest.items() if k != "created"}
    assert same == {k: v for k, v in local.manifest.items() if k != "created"}
    assert remote.completed_episodes() == {(3, 0), (3, 1)}
    for k in (0, 1):
        _assert_episode_equal(remote.episode(3, k), local.episode(3, k))
    # The records the helper wrote are what comes back (golden values: the helper's deterministic generator).
    expected = helper.make_record(1, 4)["x_t"]
    np.testing.assert_array_equal(remote.read_array(3, 1, "x_t", steps=4), expected)

    data = store.load_inference_task_data(url, task_id=3)
    assert list(data["episodes"]) == ["episode_0", "episode_1"]
    step = data["episodes"]["episode_1"]["rollout_steps"]["step_20"]
    np.testing.assert_array_equal(step["v_t"], helper.make_record(1, 4)["v_t"])
    assert step["prompt"] == helper.TASK["language"]

    report = verify.verify_store(url, decode=True)
    assert report.ok and report.episodes == 2 and report.complete == 2
    assert report.rows == verify.verify_store(tmp_path / "local").rows


@pytest.mark.slow
def test_verify_and_readers_find_damage_on_s3(s3):
    url = f"s3://{BUCKET}/runs/damaged"
    _write_store(url)
    ep = f"{BUCKET}/runs/damaged/task_003/episode_0"
    s3.rm_file(f"{ep}/x_t/c/2/0/0/0/0")  # a committed row's chunk object
    s3.pipe_file(f"{ep}/v_t/c/1/0/0/0/0", b"\0" * 40)  # a corrupted one
    report = verify.verify_store(url)
    problems = sorted(d.problem.split(" of ")[0] for d in report.damages)
    assert problems == ["checksum mismatch", "missing chunk file"]
    assert {d.episode_index for d in report.damages} == {0}
    with pytest.raises(store.MissingChunkError, match="x_t/c/2/0/0/0/0"):
        store.open_store(url).read_array(3, 0, "x_t", steps=[1, 2, 3])
    with pytest.raises(store.StoreCorruptionError, match="damaged"):
        store.open_store(url).require_intact()

    # The CLI names the store URL and exits 1.
    out = subprocess.run(
        [sys.executable, "-m", "openpi.latents.store", "verify", url, "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=dict(os.environ), check=False,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "DAMAGED task 3 episode 0" in out.stdout and "s3://latents/runs/damaged" in out.stdout


@pytest.mark.slow
def test_sigkilled_writer_partial_episode_hidden_then_resumed(s3, tmp_path):
    url = f"s3://{BUCKET}/runs/killed"
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "store_kill_helper.py"), url, str(ready)],
        cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()

    # Episodes 0 and 1 are complete; episode 2 committed >= 4 steps, is hidden from the complete-only view.
    reader = store.open_store(url)
    assert reader.completed_episodes() == {(3, 0), (3, 1)}
    partial = reader.episode(3, 2)
    assert not partial.complete and partial.committed >= 4
    np.testing.assert_array_equal(partial.read("x_t", steps=3), helper.make_record(2, 3)["x_t"])
    assert verify.verify_store(url).ok  # every committed row of the partial episode is intact too

    # The dead writer's lock stays; it is recognised as stale (same host, pid gone) and refused until broken.
    with pytest.raises(store.StoreLockedError, match="stale writer lock"):
        store.LatentStoreWriter.create_or_open(url, helper.MANIFEST, resume=True)
    with store.LatentStoreWriter.create_or_open(url, helper.MANIFEST, resume=True, break_stale_lock=True) as w:
        assert w.completed == {(3, 0), (3, 1)}
        assert not s3.exists(f"{BUCKET}/runs/killed/task_003/episode_2/commit.json")  # the partial one was deleted
        helper.write_episode(w, 2)
    reader = store.open_store(url)
    assert reader.completed_episodes() == {(3, 0), (3, 1), (3, 2)}
    np.testing.assert_array_equal(reader.read_array(3, 2, "x_t", steps=5), helper.make_record(2, 5)["x_t"])
    assert reader.attrs["resumes"][0]["deleted_incomplete"] == [[3, 2]]


def test_writer_lock_is_a_conditional_put(s3):
    url = f"s3://{BUCKET}/runs/locked"
    assert conditional_put_supported(s3)
    with store.LatentStoreWriter.create_or_open(url, helper.MANIFEST, resume=False):
        holder = json.loads(s3.cat_file(f"{BUCKET}/runs/locked/writer.lock"))
        assert holder["pid"] == os.getpid()
        with pytest.raises(store.StoreLockedError, match=f"being written by pid {os.getpid()}"):
            store.LatentStoreWriter.create_or_open(url, helper.MANIFEST, resume=True)
        # The bare lock: a second acquire is refused by the server (412 -> FileExistsError), even without the
        # pre-check, because the PUT is conditional.
        lock = ObjectLock(location.as_path(url) / "writer.lock", what="test")
        with pytest.raises(FileExistsError):
            s3.pipe_file(f"{BUCKET}/runs/locked/writer.lock", b"{}", mode="create")
        with pytest.raises(store.StoreLockedError):
            lock.acquire()
    assert not s3.exists(f"{BUCKET}/runs/locked/writer.lock")


_TAKEOVER_RACER = """
import sys, time
from openpi.latents.store import location
from openpi.latents.store.lock import ObjectLock, StoreLockedError
url, t0, rounds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
for r in range(rounds):
    lock = ObjectLock(location.as_path(f"{url}/round_{r}/writer.lock"), what="race")
    while time.time() < t0 + 2.0 * r:
        pass  # spin: start each round as close to the others as possible
    try:
        lock.acquire(break_stale=True)
        print(f"ACQUIRED {r} {lock.holder.token}", flush=True)
    except StoreLockedError:
        print(f"REFUSED {r}", flush=True)
"""


def test_concurrent_stale_lock_takeover_gives_exactly_one_writer(s3):
    """Issue 19 item 2: several processes breaking the same stale lock at once; one wins each round."""
    url, rounds, n_procs = f"s3://{BUCKET}/runs/race", 4, 4
    dead = subprocess.Popen(["true"])
    dead.wait()
    for r in range(rounds):  # a stale lock per round: a process of this host that has exited
        holder = {"host": socket.gethostname(), "pid": dead.pid, "pid_start": None, "token": f"stale{r}"}
        s3.pipe_file(f"{BUCKET}/runs/race/round_{r}/writer.lock", json.dumps(holder).encode())
    t0 = time.time() + 12.0  # after every racer has imported the store
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _TAKEOVER_RACER, url, str(t0), str(rounds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n_procs)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    lines = [line.split() for out, _ in outs for line in out.splitlines()]
    for r in range(rounds):
        winners = [w[2] for w in lines if w[:2] == ["ACQUIRED", str(r)]]
        assert len(winners) == 1, f"round {r}: {len(winners)} processes hold the lock: {lines}"
        held = json.loads(s3.cat_file(f"{BUCKET}/runs/race/round_{r}/writer.lock"))
        assert held["token"] == winners[0]  # the lock object is the winner's
        assert sum(w[:2] == ["REFUSED", str(r)] for w in lines) == n_procs - 1
    assert not [p for p in s3.find(f"{BUCKET}/runs/race") if "takeover" in p]  # no takeover record left behind


# ---------------------------------------------------------------------------------------------------------------------
# Clear errors before anything is written


def test_bucket_absent_is_a_clear_error(s3):
    url = "s3://no-such-bucket/run"
    with pytest.raises(location.ObjectStoreError, match=r"bucket 'no-such-bucket' does not exist.*create it"):
        store.check_writable(url)
    with pytest.raises(location.ObjectStoreError, match="does not exist"):
        store.LatentStoreWriter.create_or_open(url, helper.MANIFEST, resume=False)
    assert not s3.exists("no-such-bucket")


def test_missing_credentials_are_a_clear_error(s3, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    location._filesystem.cache_clear()
    try:
        with pytest.raises(location.ObjectStoreError, match=r"no object-storage credentials.*AWS_ACCESS_KEY_ID"):
            store.check_writable(f"s3://{BUCKET}/run")
    finally:
        location._filesystem.cache_clear()


def test_ray_backend_into_an_object_store_is_refused_before_any_work(s3):
    from openpi.latents import collect

    args = collect.CollectionArgs(
        preset="pi0_libero_tiny", task_ids=(0,), episodes_per_task=1, max_steps=5, backend="ray",
        output_dir=f"s3://{BUCKET}/ray_run",
    )  # fmt: skip
    with pytest.raises(collect.SetupError, match=r"--backend ray .* claim files .* shared directory"):
        collect.collect(args)
    assert not s3.exists(f"{BUCKET}/ray_run")


def test_url_errors_name_the_fix(monkeypatch):
    with pytest.raises(ValueError, match="names no bucket"):
        location.as_path("s3://")
    with pytest.raises(ValueError, match="not a supported store location"):
        location.as_path("ftp://host/x")
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if the gcs extra were not installed
    with pytest.raises(location.ObjectStoreError, match=r"uv sync --extra gcs"):
        location.as_path("gs://bucket/run")
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(location.ObjectStoreError, match=r"uv sync --extra s3"):
        store.open_store("s3://bucket/run")
    monkeypatch.setenv(location.STORAGE_OPTIONS_ENV, "[1]")
    monkeypatch.delitem(sys.modules, "s3fs")
    with pytest.raises(ValueError, match="OPENPI_STORAGE_OPTIONS must be a JSON object"):
        location.as_path("s3://bucket/run")


def test_storage_options_reach_s3fs(s3, s3_endpoint, monkeypatch):
    """OPENPI_STORAGE_OPTIONS (fsspec options as JSON) instead of the AWS_ENDPOINT_URL variable."""
    _write_store(f"s3://{BUCKET}/runs/opts", n_episodes=1)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv(location.STORAGE_OPTIONS_ENV, json.dumps({"endpoint_url": s3_endpoint}))
    with contextlib.ExitStack():
        assert store.open_store(f"s3://{BUCKET}/runs/opts").completed_episodes() == {(3, 0)}


# ---------------------------------------------------------------------------------------------------------------------
# Acceptance: a LIBERO collection into s3://, SIGKILLed mid-episode, resumed, read back by expert_data_utils and the
# analysis CLI. Tiny random-weight preset, libero_goal task 0, two 20-step episodes (4 inferences each).

COLLECT = REPO / "scripts" / "inference_latent_collection.py"
ANALYSE = REPO / "scripts" / "expert_language_analysis.py"
MAX_STEPS, N_INFERENCES = 20, 4  # replan every 5 steps


def _collect_cmd(url: str, *extra: str) -> list[str]:
    return [
        sys.executable, str(COLLECT), "--preset", "pi0_libero_tiny", "--task-suite", "libero_goal", "--task-ids", "0",
        "--episodes-per-task", "2", "--max-steps", str(MAX_STEPS), "--output-dir", url, *extra,
    ]  # fmt: skip


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=dict(os.environ))


def _analyse(url: str, out: pathlib.Path) -> dict:
    proc = _run(
        [sys.executable, str(ANALYSE), "--collection", url, "--output-dir", str(out), "--no-text-decoding",
         "--probe-shuffles", "0", "--n-boot", "20"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


def _kill_mid_episode_1(url: str, s3) -> int:
    """Starts the collection, SIGKILLs it once episode 1 has committed a step; returns its committed steps then."""
    commit = f"{url.removeprefix('s3://')}/task_000/episode_1/commit.json"
    proc = subprocess.Popen(
        _collect_cmd(url), cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )

    def committed_steps() -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return json.loads(s3.cat_file(commit))["committed_steps"]
        return None

    return helper.sigkill_once_committed(proc, committed_steps, "episode 1")


@pytest.mark.libero
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_collection_into_s3_killed_resumed_and_analysed(s3, tmp_path):
    import expert_data_utils as edu
    from openpi.latents import collect

    url = f"s3://{BUCKET}/collections/goal"
    # Clear errors before any rollout (SetupError: the CLI prints it and exits 2): a missing bucket.
    args = collect.CollectionArgs(
        preset="pi0_libero_tiny", task_suite="libero_goal", task_ids=(0,), episodes_per_task=2, max_steps=MAX_STEPS
    )
    with pytest.raises(collect.SetupError, match="bucket 'no-such-bucket' does not exist"):
        collect.collect(dataclasses.replace(args, output_dir="s3://no-such-bucket/goal"))
    with pytest.raises(collect.SetupError, match="--save-videos write local files"):
        collect.collect(dataclasses.replace(args, output_dir=url, save_videos=True))

    killed_at = _kill_mid_episode_1(url, s3)

    # Episode 0 is complete and intact; the partial episode 1 is hidden from the default (complete-only) view.
    data = edu.load_inference_task_data(url, task_id=0)
    assert list(data["episodes"]) == ["episode_0"]
    ep0 = data["episodes"]["episode_0"]
    assert ep0["metadata"]["complete"] is True and ep0["metadata"]["num_inferences"] == N_INFERENCES
    assert list(ep0["rollout_steps"]) == [f"step_{5 * i}" for i in range(N_INFERENCES)]
    ep0_before = {k: np.asarray(ep0["rollout_steps"]["step_5"][k]) for k in ("noise", "actions", "image")}
    assert ep0_before["image"].std() > 10  # a rendered frame, not zeros
    partial = edu.load_inference_task_data(url, task_id=0, include_incomplete=True)["episodes"]["episode_1"]
    assert partial["metadata"]["complete"] is False
    assert killed_at <= partial["metadata"]["committed_steps"] < N_INFERENCES
    assert edu.list_tasks(url)[0]["n_episodes"] == 1
    assert verify.verify_store(url).ok
    before = _analyse(url, tmp_path / "report_killed")
    assert before["source"]["n_episodes"] == 1

    # Resume: the dead run's lock is stale (same host, pid gone) and must be broken explicitly.
    with pytest.raises(collect.SetupError, match=r"stale writer lock.*--break-stale-lock"):
        collect.collect(dataclasses.replace(args, output_dir=url, resume=True))
    resumed = _run(_collect_cmd(url, "--resume", "--break-stale-lock"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Resuming: 1 episodes already complete, 1 to run." in resumed.stdout

    data = edu.load_inference_task_data(url, task_id=0)
    assert list(data["episodes"]) == ["episode_0", "episode_1"]
    for k in ("noise", "actions", "image"):  # episode 0 untouched by the resume
        np.testing.assert_array_equal(data["episodes"]["episode_0"]["rollout_steps"]["step_5"][k], ep0_before[k])
    ep1 = data["episodes"]["episode_1"]
    assert ep1["metadata"]["complete"] is True and ep1["metadata"]["num_inferences"] == N_INFERENCES
    assert list(ep1["rollout_steps"]) == [f"step_{5 * i}" for i in range(N_INFERENCES)]
    assert not s3.exists(f"{BUCKET}/collections/goal/writer.lock")
    report = verify.verify_store(url)
    assert report.ok and report.complete == 2
    after = _analyse(url, tmp_path / "report_resumed")
    assert after["source"]["n_episodes"] == 2
