"""Integrity of the latent store (issue 8): the store never returns wrong data.

One test per defect (each fails on the code before the commit record / lock existed), the live-reader test, the
verify command and reading format-1 stores. Small synthetic records (tests/store_kill_helper.py), no model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from openpi.latents import store
from openpi.latents.store.__main__ import main as store_cli

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from store_kill_helper import MANIFEST, STEPS_PER_EPISODE, TASK, make_record, write_episode

HELPER = pathlib.Path(__file__).parent / "store_kill_helper.py"
LEGACY_FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "legacy_store_v1.tar.gz"
EP0 = pathlib.PurePath("task_003", "episode_0")


def write_store(root, episodes=(0, 1)):
    with store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=False) as writer:
        for k in episodes:
            write_episode(writer, k)
    return root


def steps_of(root, episode=0, include_incomplete=False):
    return store.load_inference_task_data(root, 3, include_incomplete=include_incomplete)["episodes"][
        f"episode_{episode}"
    ]["rollout_steps"]


def assert_record(step, episode, i, task_id=3):
    for key, value in make_record(episode, i, task_id=task_id).items():
        got = step[key]
        if isinstance(value, str) or key == "t":
            assert got == value, key
        else:
            np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(value).view(np.uint8), key)


def start_helper(root, ready, *extra):
    proc = subprocess.Popen([sys.executable, str(HELPER), str(root), str(ready), *extra], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "helper never got ready"
        time.sleep(0.02)
    return proc


def stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# --- 1. a missing chunk never reads back as zeros ------------------------------------------------------------------
def test_missing_chunk_is_an_error_naming_the_file_not_zeros(tmp_path, capsys):
    root = write_store(tmp_path / "run")
    chunk = root / EP0 / "text_only_hidden_states" / "c" / "3" / "0" / "0" / "0" / "0"
    assert chunk.is_file()
    chunk.unlink()
    steps = steps_of(root)
    assert_record(steps["step_10"], 0, 2)  # other steps still read
    with pytest.raises(store.MissingChunkError, match=str(chunk)) as info:
        steps["step_15"]["text_only_hidden_states"]
    assert "task 3 episode 0" in str(info.value) and "rollout step 3" in str(info.value)
    with pytest.raises(store.MissingChunkError, match=str(chunk)):  # a layer across steps, too
        store.open_store(root).read_array(3, 0, "text_only_hidden_states", layer=1)

    assert store_cli(["verify", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED task 3 episode 0: {chunk}: missing chunk file of key 'text_only_hidden_states' row 3" in out
    assert "1 episodes/tasks damaged" in out

    s = store.open_store(root)
    with pytest.raises(store.StoreCorruptionError, match="--skip-damaged"):
        s.require_intact()
    assert list(s.require_intact(skip_damaged=True)) == [(3, 0)]
    assert s.episode_indices(3) == [1]


def test_analysis_source_refuses_a_damaged_collection_unless_skipping(tmp_path):
    from openpi.latents.analysis.data import source as analysis_source

    root = write_store(tmp_path / "run")
    (root / EP0 / "state" / "c" / "2" / "0").unlink()
    with pytest.raises(store.StoreCorruptionError, match=r"state/c/2/0.*\n.*--skip-damaged"):
        analysis_source.make_source(root)
    source = analysis_source.make_source(root, skip_damaged=True)
    assert source.episode_indices(3) == [1]


# --- 2. the step commit is one atomic write; damaged incomplete episodes are skipped and repaired -------------------
def legacy_store(tmp_path) -> pathlib.Path:
    """A format-1 store written by the code of commit 6f74b7a (tests/make_legacy_store.py): task 3, episode 0
    complete (6 steps), episode 1 incomplete (3 committed steps)."""
    with tarfile.open(LEGACY_FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "legacy_store_v1"


def test_half_written_format_1_commit_is_skipped_and_resume_repairs_it(tmp_path):
    root = legacy_store(tmp_path)
    # The state a reader saw (and a SIGKILL left) with the per-key attrs writes: committed_steps = N+1, N step_t.
    ep1 = root / "task_003" / "episode_1" / "zarr.json"
    meta = json.loads(ep1.read_text())
    meta["attributes"]["committed_steps"] = 4
    ep1.write_text(json.dumps(meta))

    assert list(store.load_inference_task_data(root, 3)["episodes"]) == ["episode_0"]
    assert list(store.load_inference_task_data(root, 3, include_incomplete=True)["episodes"]) == ["episode_0"]
    assert store.completed_episodes(root) == {(3, 0)}
    assert store.open_store(root).require_intact() == {}  # a damaged *incomplete* episode loses nothing complete
    with store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=True) as writer:
        assert writer.completed == {(3, 0)}
        assert not (root / "task_003" / "episode_1").exists()
        write_episode(writer, 1)
    for k in (0, 1):
        for i in range(STEPS_PER_EPISODE):
            assert_record(steps_of(root, k)[f"step_{5 * i}"], k, i)


def test_interrupted_commit_and_episode_without_zarr_json(tmp_path):
    root = write_store(tmp_path / "run", episodes=(0,))
    ep0_commit = (root / EP0 / "commit.json").read_bytes()
    # An interrupted commit leaves the temp file of the next record next to the last complete one: ignored.
    (root / EP0 / "commit.json.0123abcd.partial").write_bytes(ep0_commit[: len(ep0_commit) // 2])
    # A crash right after the episode folder was made (or its zarr.json lost): an episode without zarr.json.
    (root / "task_003" / "episode_1" / "state").mkdir(parents=True)
    data = store.load_inference_task_data(root, 3, include_incomplete=True)
    assert list(data["episodes"]) == ["episode_0"]
    assert_record(data["episodes"]["episode_0"]["rollout_steps"]["step_25"], 0, 5)
    damaged = store.open_store(root).damaged_episodes()
    assert list(damaged) == [(3, 1)] and str(root / "task_003" / "episode_1") in str(damaged[(3, 1)])
    with store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=True) as writer:
        assert writer.completed == {(3, 0)} and not (root / "task_003" / "episode_1").exists()
    assert (root / EP0 / "commit.json").read_bytes() == ep0_commit  # the complete episode is untouched

    # A damaged episode that may have finished is not deleted: resume refuses and names it.
    (root / EP0 / "commit.json").write_text("{garbage")
    with pytest.raises(store.DamagedEpisodeError, match=str(root / EP0 / "commit.json")):
        store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=True)
    assert (root / EP0).is_dir()


# --- 3. the output directory is never deleted or recreated ---------------------------------------------------------
def test_premade_directory_keeps_mode_owner_and_setgid(tmp_path):
    root = tmp_path / "premade"
    root.mkdir()
    os.chmod(root, 0o2770)
    owner = (os.getuid(), 65534) if os.getuid() == 0 else (os.getuid(), os.getgid())
    os.chown(root, *owner)
    ino = root.stat().st_ino
    store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=False).close()  # empty store: reopened next
    write_store(root, episodes=(0,))
    st = root.stat()
    assert (st.st_mode & 0o7777, (st.st_uid, st.st_gid), st.st_ino) == (0o2770, owner, ino)
    assert_record(steps_of(root)["step_0"], 0, 0)


def test_symlink_to_an_empty_directory(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    store.LatentStoreWriter.create_or_open(link, MANIFEST, resume=False).close()
    write_store(link, episodes=(0,))
    assert link.is_symlink() and (target / "zarr.json").is_file()
    assert_record(steps_of(link)["step_5"], 0, 1)


def test_mount_point(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {proc.stderr.decode().strip()}")
    try:
        store.LatentStoreWriter.create_or_open(mnt, MANIFEST, resume=False).close()
        write_store(mnt, episodes=(0,))
        assert os.path.ismount(mnt)
        assert_record(steps_of(mnt)["step_5"], 0, 1)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# --- 4. one writer at a time ---------------------------------------------------------------------------------------
def test_second_writer_is_refused_and_a_stale_lock_is_broken_only_with_the_flag(tmp_path):
    root, ready = tmp_path / "run", tmp_path / "ready"
    proc = start_helper(root, ready)
    try:
        lock = json.loads((root / "writer.lock").read_text())
        assert (lock["pid"], lock["host"]) == (proc.pid, os.uname().nodename) and lock["started"]
        for resume in (True, False):
            with pytest.raises(store.StoreLockedError, match=f"being written by pid {proc.pid} on host") as info:
                store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=resume, break_stale_lock=True)
            assert "writer.lock" in str(info.value)
        with pytest.raises(store.StoreLockedError, match=f"pid {proc.pid}"):  # the early check, too
            store.LatentStoreWriter.check_can_open(root, MANIFEST, resume=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        stop(proc)
    assert store.completed_episodes(root) == {(3, 0), (3, 1)}  # the refused writers changed nothing
    with pytest.raises(store.StoreLockedError, match=f"stale writer lock from pid {proc.pid}.*--break-stale-lock"):
        store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=True)
    with store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=True, break_stale_lock=True) as writer:
        assert json.loads((root / "writer.lock").read_text())["pid"] == os.getpid()
        write_episode(writer, 2)
    assert not (root / "writer.lock").exists()
    assert store.completed_episodes(root) == {(3, 0), (3, 1), (3, 2)}


def test_lock_from_another_pid_namespace_is_never_judged_stale(tmp_path):
    """Issue 19 item 3: a live writer in another container on this host: its pid means nothing here."""
    root = write_store(tmp_path / "run", episodes=(0,))
    dead = subprocess.Popen(["true"])
    dead.wait()
    own_ns = os.readlink("/proc/self/ns/pid")
    holder = {"host": os.uname().nodename, "pid": dead.pid, "token": "other", "started": "x", "pid_ns": "pid:[1]"}
    assert holder["pid_ns"] != own_ns
    (root / "writer.lock").write_text(json.dumps(holder))
    with pytest.raises(store.StoreLockedError, match=r"another PID namespace \(pid:\[1\]\).*never breaks"):
        store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=True, break_stale_lock=True)
    assert json.loads((root / "writer.lock").read_text())["token"] == "other"  # not broken
    holder["pid_ns"] = own_ns  # the same holder in this namespace is stale, and broken with the flag
    (root / "writer.lock").write_text(json.dumps(holder))
    with store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=True, break_stale_lock=True):
        assert json.loads((root / "writer.lock").read_text())["pid_ns"] == own_ns


def test_second_writer_in_the_same_process_is_refused(tmp_path):
    with store.LatentStoreWriter.create_or_open(tmp_path / "run", MANIFEST, resume=False):
        with pytest.raises(store.StoreLockedError, match=f"pid {os.getpid()}"):
            store.LatentStoreWriter.create_or_open(tmp_path / "run", MANIFEST, resume=True)
    store.LatentStoreWriter.create_or_open(tmp_path / "run", MANIFEST, resume=True).close()  # released at close


# --- 5. corruption errors name the array path and the episode ------------------------------------------------------
def test_corrupt_chunks_and_metadata_are_store_errors_naming_path_and_episode(tmp_path, capsys):
    root = write_store(tmp_path / "run")
    shard = root / EP0 / "expert_0_hidden_states" / "c" / "1" / "0" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-40])  # truncated shard: its index checksum fails
    chunk = root / EP0 / "actions" / "c" / "2" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[16:] = bytes(b ^ 0xFF for b in raw[16:])  # flipped bytes after the blosc header
    chunk.write_bytes(bytes(raw))
    (root / EP0 / "model_actions" / "zarr.json").write_text("not json")
    steps = steps_of(root)
    cases = {
        ("step_5", "expert_0_hidden_states"): "expert_0_hidden_states",
        ("step_10", "actions"): "actions",
        ("step_0", "model_actions"): "model_actions",
    }
    for (step, key), array in cases.items():
        with pytest.raises(store.StoreCorruptionError, match=str(root / EP0 / array)) as info:
            steps[step][key]
        assert "task 3 episode 0" in str(info.value), str(info.value)

    assert store_cli(["verify", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"{shard}: checksum mismatch of key 'expert_0_hidden_states' row 1" in out
    assert f"{chunk}: checksum mismatch of key 'actions' row 2" in out
    assert f"{root / EP0 / 'model_actions'}:" in out
    assert "episode 1" not in out


def test_verify_intact_store_and_not_a_store(tmp_path, capsys):
    root = write_store(tmp_path / "run")
    assert store_cli(["verify", str(root), "--quiet", "--decode"]) == 0
    assert "2 episodes (2 complete, 0 incomplete)" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert store_cli(["verify", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "no zarr.json" in capsys.readouterr().err
    proc = subprocess.run(
        [sys.executable, "-m", "openpi.latents.store", "verify", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "crc32" in proc.stdout


# --- format 1 (stores written before this change) ------------------------------------------------------------------
def test_format_1_store_reads_with_chunk_presence_checks(tmp_path, capsys):
    root = legacy_store(tmp_path)
    assert not (root / EP0 / "commit.json").exists()
    assert not (root / EP0 / "t" / "c" / "0").exists()  # t=0 equals the fill value: format 1 wrote no file
    data = store.load_inference_task_data(root, 3, include_incomplete=True)
    for k, n_steps in ((0, STEPS_PER_EPISODE), (1, 3)):
        episode = data["episodes"][f"episode_{k}"]
        assert list(episode["rollout_steps"]) == [f"step_{5 * i}" for i in range(n_steps)]
        for i in range(n_steps):
            assert_record(episode["rollout_steps"][f"step_{5 * i}"], k, i)
    assert data["episodes"]["episode_0"]["metadata"]["complete"] is True
    assert data["episodes"]["episode_1"]["metadata"]["complete"] is False
    assert store_cli(["verify", str(root), "--quiet"]) == 0
    assert "2 episodes (1 complete, 1 incomplete), " in capsys.readouterr().out

    chunk = root / EP0 / "text_only_hidden_states" / "c" / "3" / "0" / "0" / "0" / "0"
    chunk.unlink()
    with pytest.raises(store.MissingChunkError, match=str(chunk)):
        steps_of(root)["step_15"]["text_only_hidden_states"]
    assert store_cli(["verify", str(root), "--quiet"]) == 1
    assert str(chunk) in capsys.readouterr().out
    # (Format 1 has no checksums: a truncated or bit-flipped chunk that blosc stored uncompressed, like these tiny
    # ones, decodes without error there. Format 2's crc32c codec catches it: see the corruption test.)
    # A run resuming a format-1 store writes format-2 episodes next to the old ones.
    with store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=True) as writer:
        write_episode(writer, 1)
    assert (root / "task_003" / "episode_1" / "commit.json").exists()
    assert_record(steps_of(root, 1)["step_25"], 1, 5)


# --- a reader polling a live store ---------------------------------------------------------------------------------
def test_reader_polling_a_live_store_never_crashes_or_sees_missing_data(tmp_path):
    root, ready = tmp_path / "run", tmp_path / "ready"
    proc = start_helper(root, ready, "--episodes", "6")
    polls, seen_steps, complete_seen = 0, 0, {}
    try:
        while True:
            done = proc.poll() is not None
            s = store.open_store(root)
            polls += 1
            for t in s.task_ids():
                for name, episode in s.task_data(t, include_incomplete=True)["episodes"].items():
                    k = int(name.split("_")[1])
                    ep = s.episode(t, k)
                    steps = episode["rollout_steps"]
                    assert list(steps) == [f"step_{5 * i}" for i in range(ep.committed)]
                    for i in range(ep.committed):
                        assert_record(steps[f"step_{5 * i}"], k, i, t)
                        seen_steps += 1
                    if ep.complete:
                        before = complete_seen.setdefault((t, k), (ep.committed, ep.metadata))
                        assert before == (ep.committed, ep.metadata)
            if done:
                break
    finally:
        stop(proc)
    assert proc.returncode == 0, proc.stderr.read().decode()
    assert len(complete_seen) == 6 and polls >= 2 and seen_steps > 6 * STEPS_PER_EPISODE


def test_analysis_cli_refuses_a_damaged_collection_unless_skip_damaged(tmp_path):
    root = write_store(tmp_path / "run")
    chunk = root / EP0 / "text_only_hidden_states" / "c" / "3" / "0" / "0" / "0" / "0"
    chunk.unlink()
    script = pathlib.Path(__file__).parent.parent / "scripts" / "expert_language_analysis.py"
    common = [sys.executable, str(script), "--collection", str(root), "--no-text-decoding", "--probe-shuffles", "0"]
    common += ["--n-boot", "20"]
    refused = subprocess.run([*common, "--output-dir", str(tmp_path / "r1")], capture_output=True, text=True)
    assert refused.returncode == 2 and str(chunk) in refused.stderr and "--skip-damaged" in refused.stderr
    assert "Traceback" not in refused.stderr
    spec = importlib.util.spec_from_file_location("ela", script)
    cli = importlib.util.module_from_spec(spec)
    sys.modules["ela"] = cli  # dataclasses look their module up
    spec.loader.exec_module(cli)
    args = dict(collection=root, text_decoding=False, probe_shuffles=0, n_boot=20)
    with pytest.raises(store.StoreCorruptionError, match=str(chunk)):
        cli.main(cli.Args(**args, output_dir=tmp_path / "r2"))
    cli.main(cli.Args(**args, output_dir=tmp_path / "r3", skip_damaged=True))
    assert (tmp_path / "r3" / "report.md").is_file()


# --- issue 19: checksums that bind content and place; metadata and commit records checked ----------------------------
LEGACY_V2_FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "legacy_store_v2.tar.gz"


def test_chunk_swapped_with_another_rows_or_episodes_is_flagged_and_reads_raise(tmp_path, capsys):
    root = write_store(tmp_path / "run")
    ep0, ep1 = root / EP0, root / "task_003" / "episode_1"
    # Unsharded: two valid chunk files of actions swapped within episode 0; state of row 2 copied from episode 1.
    a2, a3 = ep0 / "actions" / "c" / "2" / "0" / "0", ep0 / "actions" / "c" / "3" / "0" / "0"
    a2_bytes, a3_bytes = a2.read_bytes(), a3.read_bytes()
    a2.write_bytes(a3_bytes)
    a3.write_bytes(a2_bytes)
    s2 = ep0 / "state" / "c" / "2" / "0"
    s2.write_bytes((ep1 / "state" / "c" / "2" / "0").read_bytes())
    # Sharded: the shard of row 1 replaced by row 4's.
    shard = ep0 / "expert_0_hidden_states" / "c" / "1" / "0" / "0" / "0" / "0"
    shard.write_bytes((ep0 / "expert_0_hidden_states" / "c" / "4" / "0" / "0" / "0" / "0").read_bytes())

    assert store_cli(["verify", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    for path, key, row in ((a2, "actions", 2), (a3, "actions", 3), (s2, "state", 2), (shard, "expert_0_hidden_states", 1)):
        assert f"{path}: checksum mismatch of key {key!r} row {row}" in out, out
    assert "episode 1" not in out
    reader = store.open_store(root).episode(3, 0)
    for key, step in (("actions", 2), ("actions", 3), ("state", 2), ("expert_0_hidden_states", 1)):
        with pytest.raises(store.StoreCorruptionError, match="does not match the checksum"):
            reader.read(key, steps=step)
    np.testing.assert_array_equal(reader.read("actions", steps=4), make_record(0, 4)["actions"])  # others still read


def test_commit_record_bit_flip_or_copy_from_another_episode_is_damage(tmp_path, capsys):
    root = write_store(tmp_path / "run")
    commit = root / EP0 / "commit.json"
    raw = commit.read_bytes()
    i = raw.index(b"put the bowl") + 4
    flipped = raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1 :]  # "put uhe bowl": still valid JSON
    json.loads(flipped)
    commit.write_bytes(flipped)
    with pytest.raises(store.DamagedEpisodeError, match="body checksum mismatch"):
        store.open_store(root).episode(3, 0)
    assert store_cli(["verify", str(root), "--quiet"]) == 1
    assert f"task 3 episode 0: {root / EP0}:" in capsys.readouterr().out
    commit.write_bytes((root / "task_003" / "episode_1" / "commit.json").read_bytes())  # another episode's record
    with pytest.raises(store.DamagedEpisodeError, match="another episode"):
        store.open_store(root).episode(3, 0)
    commit.write_bytes(raw)
    assert store_cli(["verify", str(root), "--quiet"]) == 0


@pytest.mark.parametrize(
    "edit",
    [
        ("data_type", "int32", "dtype int32"),
        ("endian", "big", "byte order"),
        ("shape", [6, 5, 8], "per-step shape"),
    ],
)
def test_array_metadata_edited_to_valid_but_wrong_values_is_refused(tmp_path, capsys, edit):
    root = write_store(tmp_path / "run")
    meta_path = root / EP0 / "actions" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    field, value, message = edit
    if field == "endian":
        meta["codecs"][0]["configuration"]["endian"] = value
    elif field == "shape":
        meta["shape"] = value
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [1, 5, 8]
    else:
        meta[field] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(store.StoreCorruptionError, match=message):
        store.open_store(root).episode(3, 0).read("actions", steps=0)
    assert store_cli(["verify", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"{meta_path}: the array metadata of key 'actions' (task 3 episode 0) disagrees with its commit record: " + (
        message
    ) in out, out


def test_format_2_store_verifies_and_reads_and_is_not_called_damaged(tmp_path, capsys):
    """A format-2 store written by the code of commit c6624e1 (write_store of store_kill_helper, episode 0 only)."""
    with tarfile.open(LEGACY_V2_FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    root = tmp_path / "legacy_store_v2"
    assert json.loads((root / EP0 / "commit.json").read_text())["format_version"] == 2
    assert store_cli(["verify", str(root), "--quiet", "--decode"]) == 0
    out = capsys.readouterr().out
    assert "1 episodes (1 complete, 0 incomplete)" in out and "intact." in out
    assert "note: 1 episodes were written in an earlier format" in out and "(not damage)" in out
    for i in range(STEPS_PER_EPISODE):
        assert_record(steps_of(root)[f"step_{5 * i}"], 0, i)
    chunk = root / EP0 / "actions" / "c" / "2" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[20] ^= 0x10
    chunk.write_bytes(bytes(raw))
    assert store_cli(["verify", str(root), "--quiet"]) == 1  # a flipped bit is still caught in format 2
    assert f"{chunk}: checksum mismatch of key 'actions' row 2" in capsys.readouterr().out


def test_episode_with_data_but_no_commit_record_is_damage_and_resume_keeps_it_aside(tmp_path, capsys):
    """Issue 19 item 7: a finished episode whose commit.json was lost (an interrupted copy)."""
    root = write_store(tmp_path / "run")
    (root / EP0 / "commit.json").unlink()
    assert store_cli(["verify", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "task 3 episode 0" in out and "missing, but the episode folder holds data of 19 keys" in out, out
    assert "--resume moves the folder aside" in out
    with pytest.raises(store.StoreCorruptionError, match="missing, but the episode folder holds data"):
        store.open_store(root).require_intact()  # the analysis refuses rather than run on fewer episodes
    with store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=True) as writer:
        assert writer.completed == {(3, 1)}
        write_episode(writer, 0)
    aside = root / "task_003" / "episode_0.kept-aside-0"
    assert (aside / "actions" / "c" / "2" / "0" / "0").is_file()  # not deleted
    assert store.completed_episodes(root) == {(3, 0), (3, 1)}
    assert store_cli(["verify", str(root), "--quiet"]) == 0
    assert json.loads((root / "zarr.json").read_text())["attributes"]["resumes"][-1]["kept_aside"] == [str(aside)]


def test_resume_check_refuses_a_damaged_finished_episode_and_a_dangling_symlink(tmp_path):
    """Issue 19 items 14-15 at the store level (the collection CLI: test_collection's setup-error cases)."""
    root = write_store(tmp_path / "run", episodes=(0,))
    (root / EP0 / "commit.json").write_text("{garbage")
    with pytest.raises(store.DamagedEpisodeError, match="Cannot resume"):
        store.LatentStoreWriter.check_can_open(root, MANIFEST, resume=True)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(NotADirectoryError, match="is a symbolic link to .*gone, which does not exist"):
        store.check_writable(link / "sub")


@pytest.mark.parametrize("where", ["a file", "the collection", "inside the collection"])
def test_analysis_output_dir_that_is_a_file_or_the_collection_is_refused_before_work(tmp_path, capsys, where):
    """Issue 19 item 13: it was a traceback after the whole analysis, or report files in the store's root."""
    root = write_store(tmp_path / "run", episodes=(0,))
    out = {"a file": tmp_path / "report.txt", "the collection": root, "inside the collection": root / "report"}[where]
    if where == "a file":
        out.write_text("x")
    script = pathlib.Path(__file__).parent.parent / "scripts" / "expert_language_analysis.py"
    spec = importlib.util.spec_from_file_location("ela", script)
    cli = importlib.util.module_from_spec(spec)
    sys.modules["ela"] = cli
    spec.loader.exec_module(cli)
    before = sorted(p.name for p in root.iterdir())
    start = time.monotonic()
    with pytest.raises(SystemExit) as info:
        cli.cli_main(["--collection", str(root), "--output-dir", str(out), "--no-text-decoding"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--output-dir" in err and "Traceback" not in err, err
    assert ("is a file" in err) if where == "a file" else ("the report would be written into the store" in err)
    assert sorted(p.name for p in root.iterdir()) == before and time.monotonic() - start < 10


def test_analysis_names_the_episode_and_step_of_a_non_finite_value(tmp_path):
    """Issue 19 item 4 (analysis side): was sklearn's "Input X contains NaN" with no episode."""
    from openpi.latents.analysis.data import source as analysis_source

    root = tmp_path / "run"
    with store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=False) as writer:
        write_episode(writer, 0)
        ep = writer.begin_episode(TASK, 1)
        for i in range(STEPS_PER_EPISODE):
            record = make_record(1, i)
            if i == 2:
                record["expert_0_hidden_states"] = record["expert_0_hidden_states"].copy()
                record["expert_0_hidden_states"][1, 0, 3, 4] = np.nan
            ep.append_step(record)
        ep.finish({"success": False})
    source = analysis_source.make_source(root)
    source.read(3, 0, "expert_0_hidden_states", layer=1)  # a clean episode reads
    with pytest.raises(analysis_source.NonFiniteValueError, match=r"task 3 episode 1: 'expert_0_hidden_states' layer 1 holds NaN or inf at rollout step\(s\) \[2\]"):
        source.read(3, 1, "expert_0_hidden_states", layer=1)
    script = pathlib.Path(__file__).parent.parent / "scripts" / "expert_language_analysis.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--collection", str(root), "--output-dir", str(tmp_path / "r"),
         "--no-text-decoding", "--probe-shuffles", "0", "--n-boot", "20"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2 and "task 3 episode 1" in proc.stderr and "rollout step(s) [2]" in proc.stderr, (
        proc.stderr[-2000:]
    )
