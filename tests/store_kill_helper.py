"""Helpers for the store tests: deterministic small records with the real keys, the SIGKILL victim, and
`sigkill_once_committed` (kills a live collection once an episode has committed a step).

Run as a script (``python tests/store_kill_helper.py ROOT READY_FILE``) it writes episodes 0 and 1 of task 3 fully,
then appends steps of episode 2 forever; after 4 committed steps of episode 2 it creates READY_FILE, so the parent
can SIGKILL it in the middle of episode 2. ``python tests/store_kill_helper.py ROOT READY_FILE --episodes N`` writes
N whole episodes over tasks 3 and 4 (a small sleep between steps, so a reader can poll the live store), then exits.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16
# Small stand-ins for pi0's sizes: L layers, Tp prefix tokens (2 cameras x 4 + 4 text), S denoising steps.
L, B, TP, TT, W0, S, TS, W1, HEADS, H, AD = 3, 1, 12, 4, 16, 2, 6, 8, 2, 5, 32
TASK = {
    "task_id": 3,
    "task_name": "put_the_bowl_on_the_plate",
    "suite": "libero_goal",
    "language": "put the bowl on the plate",
}
MANIFEST = {
    "arguments": {"suite": "libero_goal", "seed": 7},
    "capture_spec": {"expert_0": "full", "layers": None},
    "checkpoint": "gs://openpi-assets/checkpoints/pi0_libero",
}
STEPS_PER_EPISODE = 6


def sigkill_once_committed(
    proc: subprocess.Popen, committed_steps: Callable[[], int | None], what: str, timeout: float = 300
) -> int:
    """SIGKILLs `proc` as soon as `committed_steps()` (the watched episode's commit record; None while there is
    none) reaches 1; returns the committed steps read then. Fails if `proc` ends first or nothing commits in time."""
    killed_at = None
    try:
        deadline = time.monotonic() + timeout
        while killed_at is None:
            assert proc.poll() is None, f"the run ended before it was killed:\n{proc.stdout.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, f"{what} never committed a step"
            steps = committed_steps()
            if steps is not None and steps >= 1:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = steps
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return killed_at


def make_record(episode: int, step: int, *, task_id: int = 3) -> dict:
    """The record of rollout step ``step`` (env timestep 5*step) of ``episode``: every INTERFACES.md key."""
    rng = np.random.default_rng([task_id, episode, step])

    def bf16(*shape):
        return rng.standard_normal(shape, dtype=np.float32).astype(BF16)

    mask = np.zeros((B, TT), bool)
    mask[:, : 2 + step % 2] = True
    return {
        "t": 5 * step,
        "expert_0_hidden_states": bf16(L, B, TP, W0),
        "expert_0_segment_means": bf16(L, B, 3, W0),
        "text_only_hidden_states": bf16(L, B, TT, W0),
        "text_mask": mask,
        "tokenized_prompt": rng.integers(0, 257152, (B, TT), dtype=np.int32),
        "expert_1_hidden_states": bf16(S, L, B, TS, W1),
        "expert_1_segment_means": bf16(S, L, B, 2, W1),
        "attention_to_text": rng.random((S, L, B, HEADS, TS), dtype=np.float32),
        "denoise_times": np.linspace(1.0, 1.0 / S, S, dtype=np.float32),
        "x_t": rng.standard_normal((S + 1, B, H, AD), dtype=np.float32),
        "v_t": rng.standard_normal((S, B, H, AD), dtype=np.float32),
        "actions": rng.standard_normal((H, 7), dtype=np.float32),
        "executed_actions": rng.standard_normal((2, 7), dtype=np.float32),
        "model_actions": rng.standard_normal((H, AD), dtype=np.float32),
        "image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
        "wrist_image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
        "state": rng.standard_normal(8, dtype=np.float32),
        "prompt": TASK["language"],
    }


def write_episode(writer, episode: int, steps: int = STEPS_PER_EPISODE, task: dict = TASK) -> None:
    ep = writer.begin_episode(task, episode, {"init_state_index": episode, "seed": 7, "prompt": task["language"]})
    for i in range(steps):
        ep.append_step(make_record(episode, i, task_id=task["task_id"]))
    ep.finish({"success": episode % 2 == 0, "total_steps": 5 * steps, "error": None})


def main(root: str, ready_file: str) -> None:
    from openpi.latents.store import LatentStoreWriter

    with LatentStoreWriter.create_or_open(root, MANIFEST, resume=False, queue_size=2) as writer:
        write_episode(writer, 0)
        write_episode(writer, 1)
        ep = writer.begin_episode(TASK, 2, {"init_state_index": 2, "seed": 7})
        step = 0
        while True:  # until killed
            ep.append_step(make_record(2, step))
            step += 1
            if step == 4:
                writer.flush()
                pathlib.Path(ready_file).write_text("4")


def write_many(root: str, ready_file: str, n_episodes: int) -> None:
    import time

    from openpi.latents.store import LatentStoreWriter

    with LatentStoreWriter.create_or_open(root, MANIFEST, resume=False, queue_size=2) as writer:
        pathlib.Path(ready_file).write_text("started")
        for k in range(n_episodes):
            task = TASK if k % 2 == 0 else {**TASK, "task_id": 4, "task_name": "other", "language": "other"}
            ep = writer.begin_episode(task, k, {"init_state_index": k, "seed": 7, "prompt": task["language"]})
            for i in range(STEPS_PER_EPISODE):
                ep.append_step(make_record(k, i, task_id=task["task_id"]))
                time.sleep(0.01)
            ep.finish({"success": k % 2 == 0, "total_steps": 5 * STEPS_PER_EPISODE, "error": None})


if __name__ == "__main__":
    if "--episodes" in sys.argv:
        write_many(sys.argv[1], sys.argv[2], int(sys.argv[sys.argv.index("--episodes") + 1]))
    else:
        main(sys.argv[1], sys.argv[2])
