"""``--backend ray``: work units on a Ray cluster, every episode written straight into one store.

Roles:

* the driver (the `collect` process) owns the store: it holds ``writer.lock``, wrote the manifest, creates every task
  group up front and schedules work units (a task's contiguous block of episodes, `parallel.split_work`);
* a `PolicyWorker` actor per GPU (per node on a CPU-only cluster) loads the policy and runs the units it is given on
  its ``--num-envs`` env worker processes (`parallel.Coordinator`, batched inference as on one machine), writing each
  episode with `SharedStoreWriter`: one claim lock per episode, the store's commit protocol per episode.

A worker that dies (node lost, process killed) fails its call with `RayActorError`; the driver reads the store to
see which of the call's episodes are complete, reports those, and re-queues the rest on a fresh actor with
``take_over`` (the dead worker's claim is dropped and its incomplete episode group deleted first), so every episode
is written completely exactly once. ``--resume`` works as on one machine: the driver reopens the store (deleting
incomplete episodes) and only the missing episodes are scheduled. The store's path must be the same on every node
(a shared filesystem).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import logging
import os
import socket
from typing import Any

from openpi.latents import store as _store
from openpi.latents.collect.args import CollectionArgs, Plan, make_plan
from openpi.latents.collect.outputs import EpisodeOutcome, Output, task_dict
from openpi.latents.collect.parallel import Coordinator, WorkUnit, split_work
from openpi.latents.recording.interrupt import StopOnSignal
from openpi.latents.store import format as sf
from openpi.latents.store.commit import read_commit
from openpi.latents.store.shared import SharedStoreWriter, clear_claims, ensure_task_groups

logger = logging.getLogger(__name__)
MAX_WORKER_FAILURES = 3  # worker deaths tolerated per run before it gives up


def import_ray():
    """Imports Ray with its ``uv run`` worker hook off; use it instead of ``import ray`` wherever Ray is started.

    Under ``uv run`` Ray (>= 2.43) re-creates the driver's environment for every worker from a copy of the working
    directory, with the project's default dependencies only: the ``ray`` extra is missing there and every worker fails
    to start (``No module named 'ray'``). Workers here run the interpreter the node's Ray was started with, which
    `uv sync --extra ray` set up (README, "Parallel envs, batched inference, Ray"). An explicit
    ``RAY_ENABLE_UV_RUN_RUNTIME_ENV`` in the environment is kept."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # read once, when Ray's constants are imported
    import ray

    return ray


def check_ray(args: CollectionArgs) -> str | None:
    """Setup check for ``--backend ray`` (before the policy loads): Ray installed and the cluster reachable.

    Returns the address to connect to (None: start a local Ray instance)."""
    if importlib.util.find_spec("ray") is None:
        raise ImportError("--backend ray needs Ray, an optional extra: install it with `uv sync --extra ray`.")
    address = args.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local"):
        return None
    if address == "auto":
        return address
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except (OSError, ValueError) as e:
        raise ConnectionError(
            f"Ray cluster at {address!r} is unreachable ({e}). Check --ray-address / RAY_ADDRESS (host:port of the "
            "head node, e.g. 10.0.0.5:6379), or leave both unset to start a local Ray instance."
        ) from None
    return address


class _SharedOutput:
    """The `Output` side a `Coordinator` needs, on a `SharedStoreWriter` (claims; take-over of dead workers' work)."""

    def __init__(self, writer: SharedStoreWriter, take_over: set[tuple[int, int]]):
        self.writer, self.take_over = writer, take_over

    def begin(self, task: dict[str, Any], k: int, attrs: dict[str, Any]):
        return self.writer.begin_episode(task, k, attrs, take_over=(task["task_id"], k) in self.take_over)


class PolicyWorker:
    """A Ray actor: one policy, ``--num-envs`` env workers, writes its episodes into the shared store."""

    def __init__(self, args: CollectionArgs):
        from openpi.latents.collect.policy import load_policy  # the same policy as a one-machine run
        from openpi.shared.malloc import limit_malloc_arenas

        limit_malloc_arenas()
        self.plan: Plan = make_plan(args)
        self.policy = load_policy(self.plan)
        self.writer = SharedStoreWriter.open(args.output_dir, queue_size=args.queue_size)
        self.coordinator: Coordinator | None = None

    def pid(self) -> int:
        return os.getpid()

    def run_units(self, units: list[WorkUnit], take_over: set[tuple[int, int]]) -> list[EpisodeOutcome]:
        outcomes: list[EpisodeOutcome] = []
        output = _SharedOutput(self.writer, take_over)
        if self.coordinator is None:
            self.coordinator = Coordinator(self.plan, self.policy, output, StopOnSignal(), outcomes.append)
        self.coordinator.output, self.coordinator.on_outcome = output, outcomes.append
        self.coordinator.run(units)
        self.writer.flush()  # every finished episode's commit record is on disk before the driver hears of it
        return outcomes

    def close(self) -> None:
        if self.coordinator is not None:
            self.coordinator.close()
        self.writer.close()


def _connect(ray, address: str | None) -> bool:
    """Connects to (or starts) Ray; True when this call started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    return True


def _num_actors(ray) -> tuple[int, dict[str, float]]:
    """One actor per GPU, or one per alive node on a CPU-only cluster; and the resources each asks for."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return gpus, {"num_gpus": 1}
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return max(1, nodes), {"num_cpus": 1}


@dataclasses.dataclass
class _Call:
    actor: Any
    units: list[WorkUnit]
    take_over: set[tuple[int, int]]


def _complete(root, task_id: int, k: int) -> bool:
    path = root / sf.task_group_name(task_id) / sf.episode_group_name(k)
    try:
        return path.exists() and read_commit(path)[0].complete
    except sf.StoreFormatError:
        return False


def _stored_outcome(root, task_id: int, k: int) -> EpisodeOutcome:
    meta = _store.open_store(root).episode(task_id, k).metadata
    return EpisodeOutcome(task_id, k, bool(meta["success"]), int(meta["total_steps"]), meta.get("error"))


class _Driver:
    def __init__(self, ray, plan: Plan, root, on_outcome, stop: StopOnSignal):
        self.ray, self.plan, self.root, self.on_outcome, self.stop = ray, plan, root, on_outcome, stop
        self.n_actors, self.resources = _num_actors(ray)
        self.actor_cls = ray.remote(max_restarts=0, max_task_retries=0, **self.resources)(PolicyWorker)
        self.failures = 0

    def new_actor(self):
        return self.actor_cls.remote(self.plan.args)

    def run(self, units: list[WorkUnit]) -> None:
        per_call = self.plan.args.num_envs
        pending = collections.deque((u, frozenset()) for u in units)
        idle = [self.new_actor() for _ in range(min(self.n_actors, len(units)))]
        inflight: dict[Any, _Call] = {}
        try:
            while pending or inflight:
                while idle and pending:
                    batch = [pending.popleft() for _ in range(min(per_call, len(pending)))]
                    call = _Call(idle.pop(), [u for u, _ in batch], set().union(*(t for _, t in batch)))
                    inflight[call.actor.run_units.remote(call.units, call.take_over)] = call
                self.stop.check()  # a signal: the workers are killed (finally); the store stays resumable
                ready, _ = self.ray.wait(list(inflight), num_returns=1, timeout=1.0)
                if not ready:
                    continue
                ref = ready[0]
                call = inflight.pop(ref)
                try:
                    outcomes = self.ray.get(ref)
                except self.ray.exceptions.RayActorError as e:
                    pending.extend(self._recover(call, e))
                    idle.append(self.new_actor())
                    continue
                for outcome in outcomes:
                    self.on_outcome(outcome)
                idle.append(call.actor)
        finally:
            try:  # stop the idle actors' env workers cleanly; the busy ones only on an error
                self.ray.get([actor.close.remote() for actor in idle], timeout=60)
            except Exception as e:
                logger.warning("Closing Ray policy workers failed: %s", e)
            for actor in idle + [c.actor for c in inflight.values()]:
                self.ray.kill(actor)

    def _recover(self, call: _Call, error: Exception) -> list[tuple[WorkUnit, frozenset]]:
        """The call's complete episodes are reported from the store; the rest go back in the queue (take-over)."""
        self.failures += 1
        if self.failures > MAX_WORKER_FAILURES:
            raise RuntimeError(
                f"{self.failures} Ray policy workers died (last: {error}); giving up. Finished episodes are kept: "
                "fix the cause and rerun with --resume."
            ) from error
        again = []
        for unit in call.units:
            left = []
            for k in unit.episodes:
                if _complete(self.root, unit.task.task_id, k):
                    self.on_outcome(_stored_outcome(self.root, unit.task.task_id, k))
                else:
                    left.append(k)
            if left:
                again.append((WorkUnit(unit.task, tuple(left)), frozenset((unit.task.task_id, k) for k in left)))
        logger.warning(
            "A Ray policy worker died (%s); re-running %d episodes elsewhere.",
            type(error).__name__,
            sum(len(u.episodes) for u, _ in again),
        )
        return again


def run_on_ray(plan: Plan, output: Output, todo: dict[int, list[int]], on_outcome, stop: StopOnSignal) -> None:
    """Runs the `todo` episodes on the Ray cluster (see the module docstring); `output` is the driver's store."""
    ray = import_ray()

    address = check_ray(plan.args)
    writer = output.writer  # a ZarrOutput (make_plan refuses --backend ray with pickles)
    clear_claims(writer.root)  # none of this run's workers exists yet: a claim now is a dead run's
    ensure_task_groups(writer, [task_dict(t) for t in plan.tasks])
    started = _connect(ray, address)
    try:
        driver = _Driver(ray, plan, writer.root, on_outcome, stop)
        units = split_work(plan.tasks, todo, driver.n_actors * plan.args.num_envs)
        logger.info(
            "Ray: %d work units on %d policy workers (%s each) with %d env workers each.",
            len(units),
            min(driver.n_actors, len(units)),
            driver.resources,
            plan.args.num_envs,
        )
        driver.run(units)
    finally:
        if started:
            ray.shutdown()
