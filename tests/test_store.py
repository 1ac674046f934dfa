"""Tests of the latent store (the openpi.latents.store package): small synthetic records with the real keys."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import threading
import time

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
import zarr

from openpi.latents import schema, store
from openpi.latents.store import StoreFormatError, episode_writer

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from store_kill_helper import MANIFEST, STEPS_PER_EPISODE, TASK, L, make_record, write_episode

HELPER = pathlib.Path(__file__).parent / "store_kill_helper.py"


def assert_same(actual, expected, what=""):
    if isinstance(expected, str):
        assert actual == expected, what
        return
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if expected.dtype == ml_dtypes.bfloat16:  # bit-exact, NaN payloads included
        np.testing.assert_array_equal(actual.view(np.uint16), expected.view(np.uint16), err_msg=what)
    else:
        np.testing.assert_array_equal(actual, expected, err_msg=what)


def check_episode(task_data, episode: int, steps: int = STEPS_PER_EPISODE) -> None:
    ep = task_data["episodes"][f"episode_{episode}"]
    assert list(ep["rollout_steps"]) == [f"step_{5 * i}" for i in range(steps)]
    for i in range(steps):
        expected = make_record(episode, i, task_id=task_data["task_id"])
        step = ep["rollout_steps"][f"step_{5 * i}"]
        assert set(step) == set(expected)
        for key, value in expected.items():
            if key == "t":
                assert step[key] == value
            else:
                assert_same(step[key], value, f"episode {episode} step {i} {key}")


def write_store(root, episodes=(0, 1), **kwargs):
    with store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=False, **kwargs) as writer:
        for k in episodes:
            write_episode(writer, k)
    return root


# --- bf16 ----------------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:invalid value encountered in equal")  # zarr compares chunks with the NaN fill
def test_bfloat16_round_trips_bit_exactly_through_zarr_and_tensorstore(tmp_path):
    bits = np.array([0x0000, 0x8000, 0x3F80, 0xBF80, 0x7F80, 0xFF80, 0x7FC0, 0x7FC1, 0x0001, 0x7F7F], np.uint16)
    values = np.concatenate([bits, np.arange(2**16, dtype=np.uint16)[::97]]).view(ml_dtypes.bfloat16)
    arr = zarr.create_array(str(tmp_path / "a"), shape=values.shape, dtype=values.dtype, chunks=(64,), fill_value="NaN")
    arr[:] = values
    meta = json.loads((tmp_path / "a" / "zarr.json").read_text())
    assert meta["data_type"] == "bfloat16" and meta["fill_value"] == "NaN"
    back = zarr.open_array(str(tmp_path / "a"), mode="r")[:]
    assert back.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        back.view(np.uint16), bits.tolist() + np.arange(2**16, dtype=np.uint16)[::97].tolist()
    )
    native = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "a")}}).result()
    assert str(native.dtype) == 'dtype("bfloat16")' or native.dtype.name == "bfloat16"
    np.testing.assert_array_equal(np.asarray(native.read().result()).view(np.uint16), values.view(np.uint16))


# --- round trip ----------------------------------------------------------------------------------------------------
def test_round_trip_values_dtypes_shapes_and_metadata(tmp_path):
    root = write_store(tmp_path / "run")
    data = store.load_inference_task_data(root, TASK["task_id"])
    assert {k: data[k] for k in ("task_id", "task_name", "language", "suite")} == TASK
    assert list(data["episodes"]) == ["episode_0", "episode_1"]
    for k in (0, 1):
        check_episode(data, k)
        meta = data["episodes"][f"episode_{k}"]["metadata"]
        assert meta["success"] == (k == 0) and meta["total_steps"] == 5 * STEPS_PER_EPISODE
        assert meta["complete"] is True and meta["committed_steps"] == STEPS_PER_EPISODE
        assert meta["num_inferences"] == STEPS_PER_EPISODE and meta["init_state_index"] == k
        assert meta["seed"] == 7 and meta["prompt"] == TASK["language"] and meta["error"] is None
    all_tasks = store.load_inference_task_data(root)
    assert list(all_tasks) == [TASK["task_id"]]
    # the run manifest, in manifest.json and in the root attrs
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["checkpoint"] == MANIFEST["checkpoint"] and manifest["content_hash"].startswith("sha256:")
    assert manifest["code_version"] and manifest["created"]
    assert zarr.open_group(str(root), mode="r").attrs["manifest"] == manifest
    # axis names on the arrays
    array_meta = json.loads((root / "task_003" / "episode_0" / "expert_1_hidden_states" / "zarr.json").read_text())
    dims = ["step", "denoise_step", "layer", "batch", "token", "width"]
    assert array_meta["dimension_names"] == dims and array_meta["attributes"]["dims"] == dims
    assert array_meta["data_type"] == "bfloat16"


def test_read_array_selects_layers_and_steps(tmp_path):
    root = write_store(tmp_path / "run", episodes=(0,))
    s = store.open_store(root)
    recs = [make_record(0, i) for i in range(STEPS_PER_EPISODE)]
    for key, layer_axis in [("expert_0_hidden_states", 0), ("expert_1_hidden_states", 1), ("attention_to_text", 1)]:
        full = np.stack([r[key] for r in recs])
        assert_same(s.read_array(3, 0, key), full, key)
        assert_same(s.read_array(3, 0, key, layer=L - 1), np.take(full, L - 1, axis=1 + layer_axis), key)
        assert_same(s.read_array(3, 0, key, layer=1, steps=[4, 1]), np.take(full[[4, 1]], 1, axis=1 + layer_axis))
        assert_same(s.read_array(3, 0, key, steps=2), full[2])
    assert list(s.read_array(3, 0, "t")) == [5 * i for i in range(STEPS_PER_EPISODE)]
    assert list(s.read_array(3, 0, "prompt")) == [TASK["language"]] * STEPS_PER_EPISODE
    with pytest.raises(ValueError, match="no layer axis"):
        s.read_array(3, 0, "actions", layer=0)
    with pytest.raises(IndexError, match="out of range"):
        s.read_array(3, 0, "expert_0_hidden_states", layer=L)
    with pytest.raises(IndexError, match="committed"):
        s.read_array(3, 0, "actions", steps=[STEPS_PER_EPISODE])


def test_optional_cf_keys_and_varying_prompts(tmp_path):
    with store.LatentStoreWriter.create_or_open(tmp_path / "run", MANIFEST, resume=False) as writer:
        ep = writer.begin_episode(TASK, 0)
        for i in range(4):
            rec = make_record(0, i)
            if i in (1, 3):
                rec["cf_prompt"] = f"counterfactual {i}"
                rec["cf_expert_0_segment_means"] = rec["expert_0_segment_means"] + ml_dtypes.bfloat16(1)
            ep.append_step(rec)
        ep.finish({"success": False})
    s = store.open_store(tmp_path / "run")
    steps = s.task_data(3)["episodes"]["episode_0"]["rollout_steps"]
    assert "cf_prompt" not in steps["step_0"] and steps["step_5"]["cf_prompt"] == "counterfactual 1"
    assert steps["step_15"]["cf_prompt"] == "counterfactual 3"
    assert s.episode(3, 0).present_steps("cf_prompt") == [1, 3]
    assert list(s.read_array(3, 0, "cf_prompt")) == ["counterfactual 1", "counterfactual 3"]
    cf = s.read_array(3, 0, "cf_expert_0_segment_means", layer=0)
    assert_same(cf[1], (make_record(0, 3)["expert_0_segment_means"] + ml_dtypes.bfloat16(1))[0])
    assert s.episode(3, 0).metadata["prompt"] == TASK["language"]  # taken from the first step


# --- laziness ------------------------------------------------------------------------------------------------------
def test_lazy_step_access_reads_only_that_step(tmp_path):
    root = write_store(tmp_path / "run", episodes=(0,))
    data = store.load_inference_task_data(root, 3)
    step_keys = list(data["episodes"]["episode_0"]["rollout_steps"])  # listing opens no array
    # Corrupt every chunk/shard of every key except those of rollout step 2.
    ep_dir = root / "task_003" / "episode_0"
    for chunk in ep_dir.glob("*/c/*"):
        if chunk.name != "2":
            for f in [chunk] if chunk.is_file() else chunk.rglob("*"):
                if f.is_file():
                    f.write_bytes(b"garbage" * 10)
    data = store.load_inference_task_data(root, 3)
    assert list(data["episodes"]["episode_0"]["rollout_steps"]) == step_keys
    step = data["episodes"]["episode_0"]["rollout_steps"]["step_10"]
    for key, value in make_record(0, 2).items():
        if key != "t":
            assert_same(step[key], value, key)
    with pytest.raises(Exception):  # noqa: B017 - any decode error proves this step is read from disk
        data["episodes"]["episode_0"]["rollout_steps"]["step_5"]["expert_0_hidden_states"]


def test_read_array_layer_reads_only_that_layer(tmp_path, monkeypatch):
    root = write_store(tmp_path / "run", episodes=(0,))
    s = store.open_store(root)
    s.read_array(3, 0, "expert_0_hidden_states", steps=0)  # open the array (metadata) before counting
    shard_bytes = sum(
        f.stat().st_size for f in (root / "task_003/episode_0/expert_0_hidden_states/c").rglob("*") if f.is_file()
    )
    fetched = []
    original_get = zarr.storage.LocalStore.get

    async def counting_get(self, key, prototype, byte_range=None):
        buf = await original_get(self, key, prototype, byte_range)
        fetched.append(0 if buf is None else len(buf))
        return buf

    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    s.read_array(3, 0, "expert_0_hidden_states", layer=1)
    # One byte range per step for the shard index and one per step for layer 1: about 1/L of the data.
    assert sum(fetched) < shard_bytes / L + 200 * STEPS_PER_EPISODE, (sum(fetched), shard_bytes)
    assert len(fetched) <= 2 * STEPS_PER_EPISODE


# --- crash safety and resume ---------------------------------------------------------------------------------------
def test_partial_episode_hidden_by_default_and_committed_steps_trusted(tmp_path):
    root = tmp_path / "run"
    writer = store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=False)
    write_episode(writer, 0)
    ep = writer.begin_episode(TASK, 1)
    for i in range(3):
        ep.append_step(make_record(1, i))
    writer.close()  # no finish(): like a crash between steps
    # Simulate a half-written 4th step: arrays already count it, committed_steps does not.
    arr = zarr.open_array(str(root / "task_003/episode_1/expert_0_hidden_states"), mode="r+")
    arr.resize((4, *arr.shape[1:]))
    assert store.completed_episodes(root) == {(3, 0)}
    assert list(store.load_inference_task_data(root, 3)["episodes"]) == ["episode_0"]
    data = store.load_inference_task_data(root, 3, include_incomplete=True)
    partial = data["episodes"]["episode_1"]
    assert partial["metadata"]["complete"] is False and partial["metadata"]["committed_steps"] == 3
    check_episode(data, 1, steps=3)
    assert store.open_store(root).read_array(3, 1, "expert_0_hidden_states").shape[0] == 3


def test_sigkill_mid_episode_keeps_finished_episodes_and_resume_reruns_the_partial_one(tmp_path):
    root, ready = tmp_path / "run", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, str(HELPER), str(root), str(ready)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "helper never reached episode 2"
            time.sleep(0.02)
        time.sleep(0.1)  # let it write a few more steps, then kill it mid-write
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    assert store.completed_episodes(root) == {(3, 0), (3, 1)}
    data = store.load_inference_task_data(root, 3)
    assert list(data["episodes"]) == ["episode_0", "episode_1"]
    check_episode(data, 0)
    check_episode(data, 1)
    partial = store.load_inference_task_data(root, 3, include_incomplete=True)["episodes"]["episode_2"]
    committed = partial["metadata"]["committed_steps"]
    assert partial["metadata"]["complete"] is False and committed >= 4
    check_episode(store.load_inference_task_data(root, 3, include_incomplete=True), 2, steps=committed)

    with pytest.raises(FileExistsError, match="already holds 3 episodes; pass --resume"):
        store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=False)
    with pytest.raises(store.StoreLockedError, match=r"stale writer lock .* --break-stale-lock"):
        store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=True)
    with store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=True, break_stale_lock=True) as writer:
        assert writer.completed == {(3, 0), (3, 1)}
        assert not (root / "task_003" / "episode_2").exists()
        for k in range(3):
            if (3, k) not in writer.completed:
                write_episode(writer, k)
    data = store.load_inference_task_data(root, 3, include_incomplete=True)
    assert list(data["episodes"]) == ["episode_0", "episode_1", "episode_2"]
    for k in range(3):
        check_episode(data, k)
        assert data["episodes"][f"episode_{k}"]["metadata"]["complete"] is True
    resumes = zarr.open_group(str(root), mode="r").attrs["resumes"]
    assert resumes[-1]["deleted_incomplete"] == [[3, 2]]


def test_resume_rejects_a_different_manifest_naming_the_fields(tmp_path):
    root = write_store(tmp_path / "run", episodes=(0,))
    changed = {**MANIFEST, "capture_spec": {"expert_0": "pooled", "layers": None}, "checkpoint": "other"}
    with pytest.raises(ValueError, match="different manifest") as info:
        store.LatentStoreWriter.create_or_open(root, changed, resume=True)
    assert "capture_spec.expert_0" in str(info.value) and "checkpoint" in str(info.value)
    assert "arguments" not in str(info.value)
    # created / code_version / resume flags may differ
    same = {**MANIFEST, "arguments": {**MANIFEST["arguments"], "resume": True}, "code_version": "git:other"}
    store.LatentStoreWriter.create_or_open(root, same, resume=True).close()


def test_opening_rules_for_existing_and_unwritable_dirs(tmp_path):
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "file.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a latent store"):
        store.LatentStoreWriter.create_or_open(tmp_path / "notastore", MANIFEST, resume=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="--output-dir"):
        store.check_writable(tmp_path / "afile" / "run")
    with pytest.raises(PermissionError, match="not writable"):
        store.check_writable("/proc/latents_run")  # no one, root included, can create files in /proc
    assert store.check_writable(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    # an existing store without episodes is reopened without --resume
    store.LatentStoreWriter.create_or_open(tmp_path / "empty", MANIFEST, resume=False).close()
    store.LatentStoreWriter.create_or_open(tmp_path / "empty", MANIFEST, resume=False).close()


def test_corrupt_store_errors_name_the_path(tmp_path):
    root = write_store(tmp_path / "run", episodes=(0,))
    (root / "manifest.json").unlink()
    with pytest.raises(StoreFormatError, match=str(root / "manifest.json")):
        store.open_store(root)
    root = write_store(tmp_path / "run2", episodes=(0,))
    commit = root / "task_003" / "episode_0" / "commit.json"
    commit.write_text(json.dumps({"format": "openpi-latents-commit", "format_version": 2}))
    assert list(store.load_inference_task_data(root, 3)["episodes"]) == []  # skipped with a warning, no crash
    with pytest.raises(StoreFormatError, match=str(commit)):
        store.open_store(root).episode(3, 0)
    with pytest.raises(FileNotFoundError):
        store.open_store(tmp_path / "missing")


# --- writer thread -------------------------------------------------------------------------------------------------
def test_record_errors_are_raised_in_the_producer(tmp_path):
    with store.LatentStoreWriter.create_or_open(tmp_path / "run", MANIFEST, resume=False) as writer:
        ep = writer.begin_episode(TASK, 0)
        ep.append_step(make_record(0, 0))
        bad = make_record(0, 1)
        bad["actions"] = bad["actions"][:3]
        with pytest.raises(
            ValueError, match=r"record\['actions'\] has shape \[3, 7\].*first 'actions' had shape \[5, 7\]"
        ):
            ep.append_step(bad)
        bad = make_record(0, 1)
        bad["expert_0_hidden_states"] = bad["expert_0_hidden_states"].astype(np.float32)
        with pytest.raises(ValueError, match="dtype float32"):
            ep.append_step(bad)
        bad = make_record(0, 1)
        del bad["state"]
        with pytest.raises(ValueError, match=r"lacks \['state'\]"):
            ep.append_step(bad)
        with pytest.raises(ValueError, match="t=0 was already recorded"):
            ep.append_step(make_record(0, 0))
        with pytest.raises(TypeError, match="not supported"):
            ep.append_step({**make_record(0, 1), "x": np.array(["a"])})
        with pytest.raises(ValueError, match="needs 'success'"):
            ep.finish({"total_steps": 5})
        ep.append_step(make_record(0, 1))
        ep.finish({"success": True})
        with pytest.raises(ValueError, match="already complete"):
            writer.begin_episode(TASK, 0)
        with pytest.raises(ValueError, match="task_name"):
            writer.begin_episode({**TASK, "task_name": "other"}, 1)
    check_episode(store.load_inference_task_data(tmp_path / "run", 3), 0, steps=2)


def test_writer_failures_surface_in_the_producer_and_at_close(tmp_path):
    root = tmp_path / "run"
    writer = store.LatentStoreWriter.create_or_open(root, MANIFEST, resume=False)
    write_episode(writer, 0)
    ep = writer.begin_episode(TASK, 1)
    ep.append_step(make_record(1, 0))
    writer.flush()
    # A real I/O failure on the writer thread: the episode's commit record cannot be replaced by a file any more.
    meta = root / "task_003" / "episode_1" / "commit.json"
    meta.unlink()
    meta.mkdir()
    ep.append_step(make_record(1, 1))
    with pytest.raises(store.LatentStoreWriteError, match="task 3 episode 1 rollout step 1"):
        writer.flush()
    with pytest.raises(store.LatentStoreWriteError):  # sticky: every later call raises
        ep.append_step(make_record(1, 2))
    with pytest.raises(store.LatentStoreWriteError):
        writer.close()

    # A failure on the last queued item, with no later call, still surfaces at close().
    writer = store.LatentStoreWriter.create_or_open(tmp_path / "run2", MANIFEST, resume=False)
    ep = writer.begin_episode(TASK, 0)
    ep.append_step(make_record(0, 0))
    writer.flush()
    (tmp_path / "run2" / "task_003" / "episode_0" / "commit.json").unlink()
    (tmp_path / "run2" / "task_003" / "episode_0" / "commit.json").mkdir()
    ep.finish({"success": True})
    with pytest.raises(store.LatentStoreWriteError, match="finishing task 3 episode 0"):
        writer.close()


def test_producer_blocks_only_when_the_queue_is_full(tmp_path, monkeypatch):
    gate = threading.Event()
    original = episode_writer.EpisodeSink.write_step

    def gated_write_step(self, item):
        gate.wait(10)
        original(self, item)

    monkeypatch.setattr(episode_writer.EpisodeSink, "write_step", gated_write_step)
    writer = store.LatentStoreWriter.create_or_open(tmp_path / "run", MANIFEST, resume=False, queue_size=2)
    ep = writer.begin_episode(TASK, 0)
    writer.flush()
    start = time.monotonic()
    ep.append_step(make_record(0, 0))  # taken by the writer thread, which waits at the gate
    time.sleep(0.2)
    ep.append_step(make_record(0, 1))  # queued
    ep.append_step(make_record(0, 2))  # queued: queue now full
    assert time.monotonic() - start < 1.0
    blocked = threading.Thread(target=ep.append_step, args=(make_record(0, 3),))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # the 4th step waits for room
    gate.set()
    blocked.join(10)
    assert not blocked.is_alive()
    ep.finish({"success": True})
    writer.close()
    check_episode(store.load_inference_task_data(tmp_path / "run", 3), 0, steps=4)


# --- pickle format -------------------------------------------------------------------------------------------------
def test_pickle_export_equals_store_content(tmp_path):
    root = write_store(tmp_path / "run")
    paths = store.export_pickle(root, tmp_path / "export")
    assert [p.name for p in paths] == [f"task_3_{TASK['task_name']}.pkl"]
    assert paths[0].parent.name == "inference_latents"
    with pytest.raises(PermissionError, match="allow_pickle=True"):
        store.load_inference_task_data(tmp_path / "export", 3)
    eager = store.load_inference_task_data(tmp_path / "export", 3, allow_pickle=True)
    assert isinstance(eager, dict)
    lazy = store.load_inference_task_data(root, 3)
    assert {k: eager[k] for k in TASK} == TASK
    assert eager["manifest"] == store.open_store(root).manifest  # the analysis reads layer ids / cameras from it
    for k in (0, 1):
        check_episode(eager, k)
        assert eager["episodes"][f"episode_{k}"]["metadata"] == lazy["episodes"][f"episode_{k}"]["metadata"]
    assert store.load_inference_task_data(paths[0], 3, format="pickle", allow_pickle=True)["task_id"] == 3


def test_pickle_task_writer_seed_layout_and_resume(tmp_path):
    writer = store.PickleTaskWriter(tmp_path, TASK)
    for k in (0, 1):
        ep = writer.begin_episode(k, {"init_state_index": k, "seed": 7})
        for i in range(3):
            ep.append_step(make_record(k, i))
        ep.finish({"success": True, "total_steps": 15})
        with open(writer.path, "rb") as f:  # rewritten after each finished episode
            assert len(pickle.load(f)["episodes"]) == k + 1
    assert writer.path == tmp_path / "inference_latents" / f"task_3_{TASK['task_name']}.pkl"
    with pytest.raises(FileExistsError, match="--resume"):
        store.PickleTaskWriter(tmp_path, TASK)
    resumed = store.PickleTaskWriter(tmp_path, TASK, resume=True)
    assert resumed.completed == {0, 1}
    data = store.load_inference_task_data(tmp_path, 3, allow_pickle=True)
    check_episode(data, 1, steps=3)
    assert data["episodes"]["episode_1"]["metadata"]["success"] is True


def test_estimate_bytes():
    rec = make_record(0, 0)
    expected = sum(np.asarray(v).nbytes for k, v in rec.items() if k != "prompt") + 4
    assert store.estimate_bytes(rec) == expected
    assert store.estimate_bytes({"expert_0_hidden_states": ((18, 1, 816, 2048), "bfloat16")}) == 60162048
    assert schema.format_bytes(60162048) == "60.2 MB"
