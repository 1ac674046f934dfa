"""``--num-envs N``: N env worker processes, one policy here, the waiting observations batched into one model call.

Each worker (`openpi.envs.worker`: a fresh interpreter, never a fork, as LIBERO / robosuite are not fork-safe once
JAX runs, and one that imports no JAX) owns
one env at a time and runs work units: a task's contiguous block of episodes, in order. Before episode k the worker
replays the env resets of the episodes before k that it did not run (`Env.replay_resets`), so every episode sees the
scene of the sequential run; the time spent is reported (``replay_s``). This process keeps everything else as in the
sequential run: the policy, each episode's `EpisodeRecorder` (noise per task / episode / inference index, the
counterfactual rerun, one record per inference) and the store writer.

The loop waits for any worker message; every observation waiting at that moment goes into one padded
`BatchedInference` call (``--batch-inference``, the default) or one model call each (``--no-batch-inference``:
the stored arrays are then bit-identical to the sequential run's, whatever N). A condition (`conditions`) runs as in
the sequential loop: the worker gets the condition's prompt with each work unit, and each episode's recorder gives
the intervention of each inference; inferences with an intervention are never batched (one model call each).

A worker that sends nothing for ``--env-worker-timeout-s`` while it should be stepping its env (not while it waits
for actions) is taken as hung: it is killed, its episode in progress is discarded from the store, and its unfinished
episodes run again on a fresh worker (episodes are deterministic, so the result is the uninterrupted run's); a
warning names the worker and the episodes.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from openpi.envs import base as env_base
from openpi.envs import worker as env_worker
from openpi.latents.collect.args import Plan
from openpi.latents.collect.episode import EpisodeRecorder, episode_attrs, finish_metadata
from openpi.latents.collect.outputs import EpisodeOutcome, Output, task_dict
from openpi.latents.recording.interrupt import Interrupted, StopOnSignal
from openpi.latents.recording.reruns import infer_one
from openpi.policies import batching
from openpi.policies.policy import Policy

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WorkUnit:
    """A task's contiguous block of episodes, run in order by one env."""

    task: env_base.TaskInfo
    episodes: tuple[int, ...]


def split_work(tasks: tuple[env_base.TaskInfo, ...], todo: dict[int, list[int]], num_envs: int) -> list[WorkUnit]:
    """Work units for `num_envs` envs: one per task when there are enough tasks, else each task's episodes cut
    into ~equal contiguous blocks (``ceil(num_envs / tasks)`` per task). A block starting at episode k costs k env
    resets to replay, so blocks are only cut when envs would idle otherwise. Longest units first."""
    busy = [t for t in tasks if todo.get(t.task_id)]
    per_task = max(1, math.ceil(num_envs / max(1, len(busy))))
    units = []
    for task in busy:
        episodes = sorted(todo[task.task_id])
        n = min(per_task, len(episodes))
        bounds = [round(i * len(episodes) / n) for i in range(n + 1)]
        units += [WorkUnit(task, tuple(episodes[a:b])) for a, b in itertools.pairwise(bounds)]
    return sorted(units, key=lambda u: -len(u.episodes))


def worker_config(plan: Plan) -> env_worker.WorkerConfig:
    args = plan.args
    return env_worker.WorkerConfig(
        simulator=plan.simulator.name,
        seed=args.seed,
        max_steps=plan.max_steps,
        replan_steps=args.replan_steps,
        num_steps_wait=args.num_steps_wait,
        video_dir=str(args.output_dir / "videos") if args.save_videos else None,
    )


READY_TIMEOUT_S = 600.0  # a fresh worker imports the simulator (LIBERO: tens of seconds on a loaded machine)


class WorkerDied(RuntimeError):
    """An env worker process exited or failed; the message holds its traceback when it sent one."""


@dataclasses.dataclass
class _Slot:
    """The coordinator's view of one worker."""

    conn: Connection
    process: Any
    pid: int | None = None
    busy: bool = False
    task: env_base.TaskInfo | None = None
    recorder: EpisodeRecorder | None = None
    writer: Any = None
    element: dict[str, Any] | None = None  # the observation waiting for actions
    unit: WorkUnit | None = None
    finished: set[int] = dataclasses.field(default_factory=set)  # episodes of `unit` that ended
    last_heard: float = dataclasses.field(default_factory=time.monotonic)  # last message, or actions sent
    in_setup: bool = False  # between a unit's assignment and its first "begin" (env creation, reset replays)
    peak_rss_mib: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ParallelStats:
    """What the benchmark and the log report: reset replay cost, batch sizes, workers' peak RSS per episode."""

    replay_s: float = 0.0
    batch_sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    peak_rss_mib: dict[int, list[float]] = dataclasses.field(default_factory=dict)  # worker pid -> per episode


class Coordinator:
    """Runs work units on `num_envs` env workers with `policy` in this process; records into `output`."""

    def __init__(self, plan: Plan, policy: Policy, output: Output, stop: StopOnSignal, on_outcome):
        self.plan, self.policy, self.output, self.stop = plan, policy, output, stop
        self.on_outcome = on_outcome  # called with each finished episode's EpisodeOutcome
        n = plan.args.num_envs
        self.batch = batching.BatchedInference(policy, _buckets(n)) if plan.args.batch_inference else None
        self.stats = ParallelStats()
        self._interrupted: Interrupted | None = None
        self._slots: list[_Slot] = []

    def run(self, units: list[WorkUnit]) -> ParallelStats:
        """Runs `units` (starting env workers up to ``--num-envs``; they stay up for the next call until `close`)."""
        queue = collections.deque(units)
        config = worker_config(self.plan)
        fresh = []
        while len(self._slots) < min(self.plan.args.num_envs, len(units)):
            process = env_worker.start(config)
            fresh.append(_Slot(process.conn, process, process.pid))
            self._slots.append(fresh[-1])
        for slot in fresh:
            self._expect(slot, "ready")
        for slot in self._slots:
            self._assign(slot, queue)
        self._loop(queue)
        if self._interrupted is not None:
            raise self._interrupted
        return self.stats

    def close(self) -> None:
        """Stops the env workers."""
        self._shutdown()
        self._slots = []

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the loop -----------------------------------------------------------------------------------------------
    def _loop(self, queue: collections.deque) -> None:
        limit = self.plan.args.env_worker_timeout_s
        while any(s.busy for s in self._slots):
            by_conn = {s.conn: s for s in self._slots if s.busy}
            deadlines = [s.last_heard + self._limit(s) for s in by_conn.values() if s.element is None]
            timeout = None if not deadlines else max(0.0, min(deadlines) - time.monotonic())
            ready = wait(list(by_conn), timeout=timeout)
            if not ready:
                self._replace_hung(queue, limit)
                continue
            waiting = []
            for conn in ready:
                slot = by_conn[conn]
                while slot.busy and slot.element is None and conn.poll():
                    msg = self._recv(slot)
                    slot.last_heard = time.monotonic()
                    self._handle(slot, msg, queue)
                if slot.element is not None:
                    waiting.append(slot)
            if waiting:
                self._infer(waiting)

    def _limit(self, slot: _Slot) -> float:
        """How long `slot` may be silent: --env-worker-timeout-s while it steps episodes; while it sets up a unit
        (makes the env, replays resets: slow on a loaded machine) at least READY_TIMEOUT_S."""
        limit = self.plan.args.env_worker_timeout_s
        return max(limit, READY_TIMEOUT_S) if slot.in_setup else limit

    def _replace_hung(self, queue: collections.deque, limit: float) -> None:
        """Kills every worker silent for its limit while stepping; its unfinished episodes go to a fresh worker."""
        now = time.monotonic()
        for i, slot in enumerate(self._slots):
            if not slot.busy or slot.element is not None or now - slot.last_heard < self._limit(slot):
                continue
            remaining = tuple(k for k in slot.unit.episodes if k not in slot.finished)
            logger.warning(
                "env worker pid %s sent nothing for %.0f s (--env-worker-timeout-s %g): hung. Killing it and running "
                "task %d episodes %s again on a fresh worker.",
                slot.pid,
                now - slot.last_heard,
                limit,
                slot.unit.task.task_id,
                list(remaining),
            )
            slot.process.kill()
            slot.process.join(timeout=10)
            slot.conn.close()
            if slot.writer is not None:
                slot.writer.discard()  # begun again from its start by the fresh worker
            process = env_worker.start(worker_config(self.plan))
            fresh = _Slot(process.conn, process, process.pid)
            self._expect(fresh, "ready")
            self._slots[i] = fresh
            if remaining:
                queue.appendleft(WorkUnit(slot.unit.task, remaining))
            if self._interrupted is None:
                self._assign(fresh, queue)

    def _handle(self, slot: _Slot, msg: tuple, queue: collections.deque) -> None:
        kind = msg[0]
        if kind == "infer":
            slot.element = msg[1]
        elif kind == "record":
            slot.recorder.record(msg[1])
        elif kind == "begin":
            _, task_id, k, replay_s = msg
            slot.in_setup = False
            self.stats.replay_s += replay_s
            slot.writer = self.output.begin(task_dict(slot.task), k, episode_attrs(self.plan, slot.task, k))
            slot.recorder = EpisodeRecorder(self.plan, self.policy, slot.writer, slot.task, k)
        elif kind == "end":
            _, task_id, k, result, rss = msg
            slot.writer.finish(finish_metadata(result))
            slot.writer = slot.recorder = None
            slot.finished.add(k)
            self.stats.peak_rss_mib.setdefault(slot.pid, []).append(rss)
            self.on_outcome(EpisodeOutcome(task_id, k, result.success, result.total_steps, result.error))
        elif kind == "abandoned":
            slot.writer = slot.recorder = None  # left incomplete in the store: --resume re-runs it
        elif kind == "unit_done":
            slot.busy = False
            if self._interrupted is None:
                self._assign(slot, queue)
        elif kind == "error":
            raise WorkerDied(f"env worker pid {slot.pid} failed:\n{msg[1]}")
        else:  # pragma: no cover - protocol error
            raise RuntimeError(f"unexpected env worker message {kind!r}")

    def _infer(self, waiting: list[_Slot]) -> None:
        if self._interrupted is None:
            try:
                self.stop.check()
            except Interrupted as e:
                self._interrupted = e
        if self._interrupted is not None:
            for slot in waiting:
                slot.element = None
                slot.conn.send(("abandon",))
            return
        capture = self.plan.args.capture
        noises = [slot.recorder.next_noise() for slot in waiting]
        edits = [slot.recorder.intervention() for slot in waiting]
        if self.batch is not None and all(e is None for e in edits):
            requests = [batching.Request(s.element, z) for s, z in zip(waiting, noises, strict=True)]
            results = self.batch.run(requests, capture)
            self.stats.batch_sizes[len(waiting)] += 1
        else:  # interventions are not batched (their values carry a batch axis of one)
            results = []
            for slot, noise, edit in zip(waiting, noises, edits, strict=True):
                results.append(infer_one(self.policy, slot.element, noise, capture, edit))
                self.stats.batch_sizes[1] += 1
        for slot, result in zip(waiting, results, strict=True):
            slot.conn.send(("actions", result["actions"]))  # the env steps on while the rerun / record happen here
            slot.last_heard = time.monotonic()
            element, slot.element = slot.element, None
            slot.recorder.accept(element, result)

    # --- workers ------------------------------------------------------------------------------------------------
    def _assign(self, slot: _Slot, queue: collections.deque) -> None:
        if queue:
            unit = queue.popleft()
            slot.task, slot.busy, slot.unit, slot.finished, slot.in_setup = unit.task, True, unit, set(), True
            slot.last_heard = time.monotonic()
            slot.conn.send(("unit", unit.task, unit.episodes, self.plan.condition.prompt_of(unit.task)))

    def _recv(self, slot: _Slot) -> tuple:
        try:
            return slot.conn.recv()
        except (EOFError, ConnectionResetError) as e:
            slot.process.join(timeout=5)
            raise WorkerDied(
                f"env worker pid {slot.pid} exited (exit code {slot.process.exitcode}) in the middle of its work; "
                "finished episodes are kept, --resume re-runs the rest."
            ) from e

    def _expect(self, slot: _Slot, kind: str) -> None:
        if not slot.conn.poll(max(self.plan.args.env_worker_timeout_s, READY_TIMEOUT_S)):
            slot.process.kill()
            raise WorkerDied(f"env worker pid {slot.pid} did not start within {READY_TIMEOUT_S:.0f} s.")
        msg = self._recv(slot)
        if msg[0] == "error":
            raise WorkerDied(f"env worker failed to start:\n{msg[1]}")
        if msg[0] != kind:  # pragma: no cover - protocol error
            raise RuntimeError(f"env worker sent {msg[0]!r}, expected {kind!r}")
        slot.pid = msg[1]

    def _shutdown(self) -> None:
        for slot in self._slots:
            try:
                slot.conn.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
        for slot in self._slots:
            slot.process.join(timeout=30)
            if slot.process.is_alive():  # pragma: no cover - a stuck simulator
                logger.warning("env worker pid %s did not exit; killing it.", slot.pid)
                slot.process.kill()  # (SIGTERM would wait forever on a stopped process)
                slot.process.join(timeout=5)
            slot.conn.close()


def _buckets(num_envs: int) -> tuple[int, ...]:
    top = batching.bucket_size(num_envs)
    return tuple(b for b in batching.DEFAULT_BUCKETS if b <= top)


def run_parallel(
    plan: Plan, policy: Policy, output: Output, todo: dict[int, list[int]], stop: StopOnSignal, on_outcome
) -> ParallelStats:
    """Runs the `todo` episodes (task id -> episode indices) on ``--num-envs`` env workers; returns the stats."""
    units = split_work(plan.tasks, todo, plan.args.num_envs)
    logger.info(
        "Running %d episodes as %d work units on %d env workers (%s inference).",
        sum(len(u.episodes) for u in units),
        len(units),
        min(plan.args.num_envs, len(units)),
        "batched" if plan.args.batch_inference else "one observation per call",
    )
    with Coordinator(plan, policy, output, stop, on_outcome) as coordinator:
        stats = coordinator.run(units)
    logger.info(
        "Env workers: %.1f s replaying resets; batch sizes %s; peak RSS per worker per episode (MiB) %s.",
        stats.replay_s,
        dict(sorted(stats.batch_sizes.items())),
        {pid: [round(r) for r in rss] for pid, rss in stats.peak_rss_mib.items()},
        extra={"parallel_stats": stats},  # for benchmarks/parallel_collection.py
    )
    return stats
