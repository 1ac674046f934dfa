"""An env worker process: runs episodes of one simulator with a policy that lives in another process.

Simulators such as LIBERO / robosuite must not be forked once JAX runs in a process, so the parallel collection
starts these workers with the ``spawn`` start method. A worker imports only `openpi.envs` (no JAX, no model): its
policy is the coordinator at the other end of a `multiprocessing` pipe. Protocol (tuples, worker <-> coordinator)::

    coordinator -> worker: ("unit", task, episodes)     run these episodes of `task`, in order
                           ("actions", chunk)           the answer to an "infer"
                           ("abandon",)                 the answer to an "infer": stop this episode (run stopping)
                           ("stop",)                    exit
    worker -> coordinator: ("ready", pid)
                           ("begin", task_id, k, replay_s)   episode k starts (replay_s: seconds spent replaying resets)
                           ("infer", element)           a policy input; wait for "actions" / "abandon"
                           ("record", t)                the last inference ran at env step t
                           ("end", task_id, k, result, peak_rss_mib)  (result: EpisodeResult without frames)
                           ("abandoned", task_id, k)
                           ("unit_done",)
                           ("error", message)           then the worker exits

`start(config)` runs a worker as a fresh interpreter (``python -m openpi.envs.worker``) joined to the caller by a
socket pair: unlike `multiprocessing`'s ``spawn`` it does not re-import the caller's ``__main__`` (a script, the CLI,
pytest), so a worker never imports JAX and starts from a clean state in any caller, a Ray actor included. A worker
exits within a quarter second of its parent's death (`exit_with_parent`), even a SIGKILLed one.

Episode k of a task sees the scene of an uninterrupted sequential run: the worker replays the env resets of the
episodes before k that it did not run itself (`Env.replay_resets`), and reports how long that took.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from openpi import envs
from openpi.envs import base
from openpi.shared.malloc import limit_malloc_arenas


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs to run episodes (picklable; the policy side stays with the coordinator)."""

    simulator: str  # `openpi.envs` registry name
    seed: int
    max_steps: int
    replan_steps: int
    num_steps_wait: int
    video_dir: str | None = None  # save an MP4 per episode there (None: no frames kept)


class Abandoned(Exception):
    """The coordinator asked to abandon the episode (the run is stopping)."""


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _RemotePolicy:
    def __init__(self, conn: Connection):
        self._conn = conn

    def __call__(self, element: dict[str, Any]) -> np.ndarray:
        self._conn.send(("infer", element))
        reply = self._conn.recv()
        if reply[0] == "abandon":
            raise Abandoned()
        if reply[0] != "actions":
            raise RuntimeError(f"env worker: expected actions, got {reply[0]!r}")
        return reply[1]

    def on_inference(self, t: int, element: dict[str, Any], chunk: np.ndarray) -> None:
        self._conn.send(("record", t))


def _run_unit(
    conn: Connection, config: WorkerConfig, sim: base.Simulator, env, task, episodes, prompt: str | None
) -> Any:
    """Runs `episodes` of `task` with `prompt` (None: the task's instruction), reusing `env` when it is this task's
    and has not passed the first episode."""
    if env is not None and (env.task != task or env.num_resets > episodes[0]):
        env.close()
        env = None
    if env is None:
        env = sim.make_env(task, config.seed)
    policy = _RemotePolicy(conn)
    for k in episodes:
        start = time.perf_counter()
        if env.num_resets < k:  # the resets of the episodes before k that other workers ran
            env.replay_resets(k)
        conn.send(("begin", task.task_id, k, time.perf_counter() - start))
        try:
            result = base.run_episode(
                env,
                k,
                policy,
                prompt=prompt,
                max_steps=config.max_steps,
                replan_steps=config.replan_steps,
                on_inference=policy.on_inference,
                record_frames=config.video_dir is not None,
                num_steps_wait=config.num_steps_wait,
            )
        except Abandoned:
            conn.send(("abandoned", task.task_id, k))
            return env
        if config.video_dir is not None and result.frames:
            name = f"task{task.task_id:03d}_ep{k:03d}_{'success' if result.success else 'failure'}.mp4"
            base.save_video(result.frames, os.path.join(config.video_dir, name))
        conn.send(("end", task.task_id, k, dataclasses.replace(result, frames=None), peak_rss_mib()))
    return env


def exit_with_parent(parent_pid: int, poll_s: float = 0.25) -> None:
    """Exits this process (at once, whatever it is doing) within `poll_s` of its parent's death: a SIGKILLed
    coordinator cannot stop its workers, which would otherwise run on for seconds holding ~1.7 GB each. (A polling
    thread rather than PR_SET_PDEATHSIG, which fires when the *thread* that started the worker exits.)"""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main(conn: Connection, config: WorkerConfig, parent_pid: int | None = None) -> None:
    """The worker process's entry point (a `multiprocessing` target)."""
    if parent_pid is not None:
        exit_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the coordinator decides
    limit_malloc_arenas()  # flat RSS, as in the sequential run (before the simulator starts its threads)
    env = None
    try:
        sim = envs.get(config.simulator)
        sim.configure()
        conn.send(("ready", os.getpid()))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            if msg[0] != "unit":
                raise RuntimeError(f"env worker: unexpected message {msg[0]!r}")
            env = _run_unit(conn, config, sim, env, *msg[1:])
            conn.send(("unit_done",))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the coordinator is gone
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except (OSError, BrokenPipeError):
            pass
    finally:
        if env is not None:
            env.close()


class WorkerProcess:
    """A started worker: `conn` (the coordinator's end of the socket pair) and its process."""

    def __init__(self, conn: Connection, process: subprocess.Popen):
        self.conn, self.process = conn, process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def exitcode(self) -> int | None:
        return self.process.poll()

    def is_alive(self) -> bool:
        return self.process.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        if self.is_alive():
            self.process.terminate()

    def kill(self) -> None:
        if self.is_alive():
            self.process.kill()


def start(config: WorkerConfig) -> WorkerProcess:
    """Starts a worker process for `config`; its "ready" message follows on `conn` once the simulator is set up."""
    ours, theirs = socket.socketpair()
    env = dict(os.environ)
    src = str(pathlib.Path(__file__).resolve().parents[2])  # this openpi's import root wins in the child
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "openpi.envs.worker", str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),),
            env=env,
        )
    finally:
        theirs.close()
    conn = Connection(ours.detach())
    conn.send(config)
    return WorkerProcess(conn, process)


if __name__ == "__main__":
    from openpi.envs import worker as _worker  # the importable module (its classes are the ones pickles name)

    _conn = Connection(int(sys.argv[1]))
    _worker.main(_conn, _conn.recv(), int(sys.argv[2]) if len(sys.argv) > 2 else None)
