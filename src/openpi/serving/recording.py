"""What the server records: one store record per inference, grouped into episodes.

Two ways an inference finds its episode (request fields: `protocol.RECORD_FIELDS`):
  * harness mode — the request carries ``episode_id`` (and ``task_id``, default 0): the episode is (task_id,
    episode_id) of the store; a ``success`` frame, a request for another episode on the same connection, or the
    connection closing ends it (only the ``success`` frame stores a known outcome);
  * connection mode — no ``episode_id``: the inferences of one connection go, in arrival order, to episodes of the
    "connections" pseudo-task (`protocol.CONNECTIONS_TASK_ID`), numbered in order of first inference. The episodes
    are inferred (openpi's LIBERO example keeps one connection for a whole evaluation): a new one starts at
    the connection's first inference, after a ``success`` frame, when the prompt changes, and at an environment reset,
    detected as the robot state returning to within `RESET_TOLERANCE` (L2, state units) of the state at the episode's
    first inference after having been farther than that from it (a reset puts the robot back to its initial pose:
    LIBERO's differs by ~0.02 between initial states, 5 executed actions move it by ~0.4). Each episode's metadata
    says how it was delimited (``start``, ``end``, ``delimited_by`` "inferred" or "reported"); the log says so too.
    A reset before the robot moved away from its first state cannot be seen; send ``episode_id`` to be exact.
A step's ``t`` is the request's ``t``, else its inference index in the episode; ``received_time`` is the unix time the
server got the request. The noise of inference i of episode (task, k) is draw i of ``default_rng([seed, task, k])``
(`openpi.latents.recording.records.episode_noise`, the collection's), so a harness replaying the collection's episode
ids with its seed gets the collection's noise. Thread-safe: connections are served on several threads.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from openpi.envs import base as env_base
from openpi.latents.recording.records import episode_noise
from openpi.serving.protocol import CONNECTIONS_TASK_ID, RecordFields, RequestError

logger = logging.getLogger(__name__)

# How close (L2) a connection's state must come back to its episode's first state to count as an environment reset.
RESET_TOLERANCE = 0.05

CONNECTIONS_TASK = {"task_id": CONNECTIONS_TASK_ID, "task_name": "connections", "suite": "server", "language": ""}


@dataclasses.dataclass
class Episode:
    """One open episode: its store writer, noise stream and the t values used so far."""

    key: tuple[int, int]
    writer: Any  # an EpisodeWriter, made at the first recorded step (an episode without one writes nothing)
    noise: Iterator[np.ndarray]
    seen_t: set[int] = dataclasses.field(default_factory=set)
    state_shape: tuple[int, ...] | None = None
    num_inferences: int = 0
    last_t: int | None = None
    prompt: str | None = None
    first_state: np.ndarray | None = None  # connection mode: the state of the first inference (reset detection)
    left_first_state: bool = False

    def next_t(self, requested: int | None) -> int:
        t = self.num_inferences if requested is None else requested
        if t in self.seen_t:
            raise RequestError(f"task {self.key[0]} episode {self.key[1]} already has a step t={t}; send distinct t.")
        return t


class Recorder:
    """The store side of the server: episodes, noise and step records for every connection."""

    def __init__(
        self,
        writer: Any,
        *,
        seed: int,
        noise_shape: tuple[int, int],
        simulator: env_base.Simulator,
        store_images: bool = True,
    ):
        self.writer = writer  # a LatentStoreWriter, or None: serve without recording
        self.seed = seed
        self.noise_shape = noise_shape
        self.simulator = simulator
        self.store_images = store_images
        self._lock = threading.Lock()
        self._open: dict[tuple[int, int], Episode] = {}
        self._pending: dict[tuple[int, int], tuple[dict[str, Any], dict[str, Any]]] = {}  # begin_episode arguments
        self._tasks: dict[int, dict[str, Any]] = {}
        done = writer.completed if writer is not None else set()
        self._next_connection = 1 + max((k for t, k in done if t == CONNECTIONS_TASK_ID), default=-1)

    # --- episodes -----------------------------------------------------------------------------------------------
    def new_connection_episode(self, attrs: Mapping[str, Any], start: str) -> Episode:
        with self._lock:
            k, self._next_connection = self._next_connection, self._next_connection + 1
            return self._begin(CONNECTIONS_TASK, k, {**attrs, "start": start, "delimited_by": "inferred"})

    def harness_episode(self, fields: RecordFields, prompt: str, attrs: Mapping[str, Any]) -> Episode:
        assert fields.episode_id is not None
        task_id = 0 if fields.task_id is None else fields.task_id
        key = (task_id, fields.episode_id)
        with self._lock:
            if key in self._open:
                raise RequestError(
                    f"task {task_id} episode {fields.episode_id} is being recorded by another "
                    "connection; give each connection its own episode_id."
                )
            if self.writer is not None and key in self.writer.completed:
                raise RequestError(
                    f"task {task_id} episode {fields.episode_id} is already recorded in "
                    f"{self.writer.root}; use a new episode_id."
                )
            task = self._tasks.setdefault(
                task_id,
                {
                    "task_id": task_id,
                    "task_name": fields.task_name or f"task_{task_id}",
                    "suite": fields.suite or "harness",
                    "language": prompt,
                },
            )
            return self._begin(task, fields.episode_id, {**attrs, "start": "episode_id", "delimited_by": "reported"})

    def _begin(self, task: Mapping[str, Any], k: int, attrs: Mapping[str, Any]) -> Episode:
        episode = Episode((int(task["task_id"]), k), None, episode_noise(self.seed, task["task_id"], k, self.noise_shape))
        # The store episode begins with its first recorded step: a request that fails (bad input, transforms) before
        # any step leaves no empty episode marked complete.
        self._pending[episode.key] = (dict(task), {"seed": self.seed, **attrs})
        self._open[episode.key] = episode
        logger.info("Recording task %d episode %d", *episode.key)
        return episode

    def finish(self, episode: Episode, success: bool | None, end: str) -> dict[str, Any]:
        """Ends `episode`; `success` None: the outcome was not reported. Returns what the store records."""
        meta = {
            "success": success,
            "end": end,
            "error": None,
            "last_t": episode.last_t,
            "num_inferences": episode.num_inferences,
        }
        with self._lock:
            self._open.pop(episode.key, None)
            self._pending.pop(episode.key, None)
        if episode.writer is None and episode.num_inferences == 0:
            logger.info("Task %d episode %d ended (%s) before any inference was recorded: nothing stored", *episode.key, end)
        if episode.writer is not None:
            episode.writer.finish(meta)
            if success is not None:  # a reported outcome is answered once the episode is on disk
                self.writer.flush()
        logger.info(
            "Task %d episode %d ended (%s, success=%s) after %d inferences",
            *episode.key,
            end,
            success,
            episode.num_inferences,
        )
        return {"task_id": episode.key[0], "episode_id": episode.key[1], **meta}

    def close(self, end: str) -> None:
        """Ends every open episode (outcome unknown) and closes the store (raises a writer failure)."""
        with self._lock:
            still_open = list(self._open.values())
        for episode in still_open:
            self.finish(episode, None, end)
        if self.writer is not None:
            self.writer.close()

    # --- steps --------------------------------------------------------------------------------------------------
    def check_step(self, episode: Episode, obs: Mapping[str, Any]) -> None:
        """Checks what would make the step unrecordable (besides `Episode.next_t`), before the inference runs."""
        shape = tuple(np.shape(obs[self.simulator.state_key]))
        if episode.state_shape is not None and shape != episode.state_shape:
            raise RequestError(
                f"observation[{self.simulator.state_key!r}] has shape {list(shape)}, but this episode's "
                f"first had {list(episode.state_shape)}."
            )

    def record(
        self,
        episode: Episode,
        t: int,
        obs: Mapping[str, Any],
        result: Mapping[str, Any],
        *,
        prompt: str,
        sent_prompt: str | None,
        received_time: float,
    ) -> None:
        """Queues the step record of one inference (keys: `openpi.latents.schema`)."""
        sim = self.simulator
        record = {
            "t": t,
            "prompt": prompt,
            "received_time": np.float64(received_time),
            "actions": np.asarray(result["actions"], np.float32),
            "model_actions": np.asarray(result["model_actions"], np.float32),
            "noise": np.asarray(result["noise"], np.float32),
            "state": np.asarray(obs[sim.state_key], np.float32),
            **result["latents"],
        }
        if sent_prompt is not None:
            record["sent_prompt"] = sent_prompt
        if self.store_images:
            record.update({key: obs[input_key] for key, input_key in sim.camera_keys.items()})
        if self.writer is not None:
            with self._lock:
                if episode.writer is None:
                    task, attrs = self._pending.pop(episode.key)
                    episode.writer = self.writer.begin_episode(task, episode.key[1], attrs)
            episode.writer.append_step(record)
        episode.seen_t.add(t)
        episode.state_shape = record["state"].shape
        episode.num_inferences += 1
        episode.last_t = t


class Session:
    """The episodes of one connection: at most one open at a time."""

    def __init__(self, recorder: Recorder, attrs: Mapping[str, Any]):
        self.recorder = recorder
        self.attrs = dict(attrs)  # stored with each of its episodes (connection number, peer)
        self.current: Episode | None = None
        self.episodes_started = 0

    def _connection_boundary(self, current: Episode, prompt: str, state: np.ndarray | None) -> str | None:
        """Why `current` (a connection-mode episode) ends before this request, or None (it continues)."""
        if prompt != current.prompt:
            return "prompt change"
        if state is None or current.first_state is None or state.shape != current.first_state.shape:
            return None
        near = float(np.linalg.norm(state - current.first_state)) <= RESET_TOLERANCE
        if near and current.left_first_state:
            return "reset detected"
        current.left_first_state |= not near
        return None

    def episode_for(self, fields: RecordFields, prompt: str, state: np.ndarray | None = None) -> Episode:
        """The open episode this request belongs to; starting it (and ending the previous one) if needed."""
        current = self.current
        start = "connection opened" if self.episodes_started == 0 else "after a success frame"
        if fields.episode_id is None:
            if current is not None and current.key[0] == CONNECTIONS_TASK_ID:
                boundary = self._connection_boundary(current, prompt, state)
                if boundary is None:
                    return current
                logger.info(
                    "Connection %s: episode %d ended at an inferred boundary (%s); a new one starts",
                    self.attrs.get("connection"), current.key[1], boundary,
                )  # fmt: skip
                self.recorder.finish(current, None, boundary)
                self.current, start = None, boundary
        elif current is not None and current.key == (fields.task_id or 0, fields.episode_id):
            return current
        if self.current is not None:
            self.recorder.finish(self.current, None, "superseded")
            self.current = None
        if fields.episode_id is None:
            if self.episodes_started == 0:
                logger.info(
                    "Connection %s sends no episode_id: its episodes are inferred (new at a prompt change, a success "
                    "frame or an environment reset); send episode_id to name them",
                    self.attrs.get("connection"),
                )
            self.current = self.recorder.new_connection_episode(self.attrs, start)
            self.current.prompt = prompt
            self.current.first_state = None if state is None else np.asarray(state, np.float64)
        else:
            self.current = self.recorder.harness_episode(fields, prompt, self.attrs)
        self.episodes_started += 1
        return self.current

    def end(self, fields: RecordFields) -> dict[str, Any]:
        """A `success` frame: ends the open episode (the one named, if the frame names one)."""
        current = self.current
        if current is None:
            raise RequestError(
                "a 'success' frame ends an episode, but this connection has none open (send an observation first)."
            )
        if fields.episode_id is not None and current.key != (fields.task_id or 0, fields.episode_id):
            raise RequestError(
                f"the 'success' frame names task {fields.task_id or 0} episode {fields.episode_id}, "
                f"but this connection is recording task {current.key[0]} episode {current.key[1]}."
            )
        self.current = None
        return self.recorder.finish(current, fields.success, "reported")

    def close(self, end: str) -> None:
        if self.current is not None:
            current, self.current = self.current, None
            self.recorder.finish(current, None, end)
