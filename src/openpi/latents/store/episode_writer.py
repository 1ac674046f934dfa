"""One episode of the latent store writer: the producer-side handle and the writer-thread state.

:class:`EpisodeWriter` (returned by ``LatentStoreWriter.begin_episode``) validates each record in the caller's
thread, so a wrong key/shape/dtype is raised where it was made, then queues it. :class:`EpisodeSink` lives on the
writer thread and does the zarr writes: per step, each array is grown by one row and the row written (through a
:class:`ChecksumStore` / :class:`ChecksumFsspecStore`, which note the bound checksum of every file written: its
content and its place, see ``checksums``), then the
episode's commit record (``commit.json``: committed_steps, step_t, fields, sparse_steps, string_tables, attrs,
checksums) is replaced in one atomic write (see ``commit``).

Record rules: ``t`` (int env timestep, distinct within the episode) is required. The first step's keys are required
on every step; keys starting with ``cf_`` and keys first seen after the first step are optional (stored compactly,
with the rollout steps where they occur in the attr ``sparse_steps``). A key keeps the shape and dtype of its first
occurrence: pad variable-length values (e.g. ``executed_actions`` of a truncated last chunk) to that shape.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from openpi.latents.store import checksums as checksums_lib
from openpi.latents.store import commit as commit_lib
from openpi.latents.store import format as sf
from openpi.latents.store import location
from openpi.latents.store import manifest as manifest_lib

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class _ChecksumMixin:
    """Notes the bound checksum (``checksums``: content + path in the store) of every file the zarr store writes in
    ``written`` (key -> checksum), so the sink can put the checksums of a step's chunk files into its commit record without reading them back; ``put_atomic`` is the
    commit point."""

    written: dict[str, int]

    async def set(self, key: str, value) -> None:
        if getattr(self, "written", None) is not None:
            self.written[key] = checksums_lib.bound_checksum(key, value.as_numpy_array())
        await super().set(key, value)  # type: ignore[misc]

    def put_atomic(self, key: str, data: bytes) -> None:
        """One atomic write of ``data`` at ``key`` (the commit point: a rename here, a single PUT on S3/GCS)."""
        sync(super().set(key, default_buffer_prototype().buffer.from_bytes(data)))  # type: ignore[misc]


class ChecksumStore(_ChecksumMixin, LocalStore):
    """zarr's LocalStore (each ``set`` is a temp file + rename) with checksums (``_ChecksumMixin``)."""


class ChecksumFsspecStore(_ChecksumMixin, FsspecStore):
    """zarr's FsspecStore (each ``set`` is one PUT, atomic on S3/GCS) with checksums (``_ChecksumMixin``)."""


def checksum_store(root: location.StorePath) -> ChecksumStore | ChecksumFsspecStore:
    """The writer's zarr store at ``root`` (a local directory or an object-storage prefix)."""
    cls = ChecksumFsspecStore if location.is_remote(root) else ChecksumStore
    return location.zarr_store(root, read_only=False, store_class=cls)


@dataclasses.dataclass(frozen=True)
class StepItem:
    """One validated rollout step on its way to the writer thread."""

    values: dict[str, np.ndarray | str]
    t: int
    new_fields: dict[str, sf.FieldSpec]
    extra_attrs: dict[str, Any]


class EpisodeSink:
    """Writer-thread state of one episode (never touched by the producer after construction)."""

    def __init__(self, task_id: int, episode_index: int, attrs: dict[str, Any]):
        self.task_id = task_id
        self.episode_index = episode_index
        self.attrs = attrs
        self.group: zarr.Group | None = None
        self.arrays: dict[str, zarr.Array] = {}
        self.fields: dict[str, sf.FieldSpec] = {}
        self.committed = 0
        self.step_t: list[int] = []
        self.sparse: dict[str, list[int]] = {}
        self.strings: dict[str, list[str]] = {}
        self.commit_attrs: dict[str, Any] = {}
        self.checksums: dict[str, list[int | None]] = {}
        self._string_index: dict[str, dict[str, int]] = {}
        self._store: ChecksumStore | ChecksumFsspecStore | None = None
        self._prefix = ""

    def open(self, task_group: zarr.Group, store: ChecksumStore | ChecksumFsspecStore) -> None:
        self._store = store
        self._prefix = f"{sf.task_group_name(self.task_id)}/{sf.episode_group_name(self.episode_index)}"
        attrs = {**self.attrs, sf.EPISODE_COMMIT_MARKER: sf.COMMIT_FILE}
        self.group = task_group.create_group(sf.episode_group_name(self.episode_index), attributes=attrs)
        self._commit(complete=False)

    def _encode_string(self, key: str, value: str) -> np.ndarray:
        index = self._string_index.setdefault(key, {})
        if value not in index:
            index[value] = len(index)
            self.strings.setdefault(key, []).append(value)
        return np.asarray(index[value], dtype=np.int32)

    def _commit(self, *, complete: bool) -> None:
        """The commit point: one atomic write of the whole commit record; after it the steps so far count."""
        assert self._store is not None
        record = commit_lib.CommitRecord(
            committed_steps=self.committed,
            complete=complete,
            step_t=self.step_t,
            fields=self.fields,
            sparse=self.sparse,
            strings=self.strings,
            attrs=self.commit_attrs,
            checksums=self.checksums,
        )
        self._store.put_atomic(f"{self._prefix}/{sf.COMMIT_FILE}", record.to_json_bytes(self._prefix))

    def _write_row(self, key: str, row: int, data: np.ndarray) -> None:
        spec = self.fields[key]
        arr = self.arrays[key]
        chunk = sf.row_chunk_key(spec, row)
        arr.resize((row + 1, *spec.shape))
        arr[row] = data
        crc = None
        if chunk is not None:
            written = self._store.written  # type: ignore[union-attr]
            try:
                crc = written.pop(f"{self._prefix}/{chunk}")
            except KeyError:
                raise RuntimeError(f"zarr wrote no file {self._prefix}/{chunk} for row {row} of {key!r}") from None
        self.checksums[key].append(crc)

    def write_step(self, item: StepItem) -> None:
        assert self.group is not None, "episode group not created"
        for key, spec in item.new_fields.items():
            self.fields[key] = spec
            self.arrays[key] = self.group.create_array(key, **sf.array_create_kwargs(spec))
            self.checksums[key] = []
            if spec.optional:
                self.sparse[key] = []
        self._store.written.clear()  # type: ignore[union-attr]
        for key, value in item.values.items():
            spec = self.fields[key]
            row = len(self.sparse[key]) if spec.optional else self.committed
            self._write_row(key, row, self._encode_string(key, value) if spec.is_string else value)
        for key in item.values:
            if self.fields[key].optional:
                self.sparse[key].append(self.committed)
        self.committed += 1
        self.step_t.append(item.t)
        self.commit_attrs.update(item.extra_attrs)
        self._commit(complete=False)

    def finish(self, metadata: dict[str, Any]) -> None:
        assert self.group is not None, "episode group not created"
        self.commit_attrs.update(metadata)
        self._commit(complete=True)


class WriteQueue(Protocol):
    """What an :class:`EpisodeWriter` needs of the store writer (`writer.LatentStoreWriter`): its failure check, its
    queue to the background thread, and the note that an episode is finished. The writer creates the episode
    writers, so this side names only the contract."""

    def _check(self) -> None: ...
    def _put(self, item: tuple) -> None: ...
    def _episode_finished(self, sink: EpisodeSink) -> None: ...


class EpisodeWriter:
    """Producer-side handle of one episode: ``append_step(record)`` per inference, then ``finish(metadata)``."""

    def __init__(self, writer: WriteQueue, sink: EpisodeSink):
        self._writer = writer
        self._sink = sink
        self.task_id = sink.task_id
        self.episode_index = sink.episode_index
        self._has_prompt_attr = "prompt" in sink.attrs
        self._fields: dict[str, sf.FieldSpec] = {}
        self._required: frozenset[str] | None = None
        self._seen_t: set[int] = set()
        self._num_steps = 0
        self._finished = False
        self._t0 = time.monotonic()

    @property
    def num_steps(self) -> int:
        """Steps appended so far (queued, not necessarily on disk yet)."""
        return self._num_steps

    def _where(self) -> str:
        return f"task {self.task_id} episode {self.episode_index} step {self._num_steps}"

    def append_step(self, record: Mapping[str, Any]) -> None:
        """Queues one rollout step (blocks only while the writer queue is full).

        Writable numpy arrays are copied; read-only ones (e.g. from jax) are queued by reference: don't modify them.
        """
        self._writer._check()
        if self._finished:
            raise RuntimeError(f"{self._where()}: episode already finished; begin a new episode.")
        if not isinstance(record, Mapping) or "t" not in record:
            raise ValueError(f"{self._where()}: a step record is a dict that includes 't' (the env timestep).")
        values: dict[str, np.ndarray | str] = {}
        for key, value in record.items():
            if not isinstance(key, str) or not _KEY_RE.match(key):
                raise ValueError(f"{self._where()}: record key {key!r} must match {_KEY_RE.pattern}.")
            values[key] = sf.normalize_value(key, value)
        t_arr = values["t"]
        if isinstance(t_arr, str) or t_arr.shape != () or t_arr.dtype.kind not in "iu":
            raise TypeError(f"{self._where()}: 't' must be an int scalar (env timestep), got {record['t']!r}.")
        t = int(t_arr)
        if t in self._seen_t:
            raise ValueError(f"{self._where()}: t={t} was already recorded; each rollout step needs a distinct t.")
        new_fields: dict[str, sf.FieldSpec] = {}
        for key, value in values.items():
            spec = sf.field_spec_for(key, value)
            if self._num_steps > 0 and key not in self._fields:
                spec = dataclasses.replace(spec, optional=True)
            old = self._fields.get(key)
            if old is None:
                new_fields[key] = spec
            elif (old.shape, old.dtype) != (spec.shape, spec.dtype):
                raise ValueError(
                    f"{self._where()}: record[{key!r}] has {spec.describe()}, but the episode's first {key!r} had "
                    f"{old.describe()}; every step must match it (pad or cast the value)."
                )
        if self._required is None:
            self._required = frozenset(k for k, s in new_fields.items() if not s.optional)
        missing = sorted(self._required - values.keys())
        if missing:
            raise ValueError(
                f"{self._where()}: record lacks {missing}, which the first step had; every step needs the first "
                "step's keys (only 'cf_*' keys may come and go)."
            )
        extra_attrs = {}
        if not self._has_prompt_attr and isinstance(values.get("prompt"), str):
            extra_attrs["prompt"] = values["prompt"]
            self._has_prompt_attr = True
        self._writer._put(("step", self._sink, StepItem(values, t, new_fields, extra_attrs)))
        self._fields.update(new_fields)
        self._seen_t.add(t)
        self._num_steps += 1

    def discard(self) -> None:
        """Queues the removal of this unfinished episode (its worker hung): after the steps already queued, its folder
        is deleted, and the episode may be begun again in this run."""
        self._writer._check()
        if self._finished:
            raise RuntimeError(f"task {self.task_id} episode {self.episode_index}: already finished or discarded.")
        self._finished = True
        self._writer._put(("discard", self._sink))
        self._writer._open.discard((self.task_id, self.episode_index))

    def finish(self, metadata: Mapping[str, Any]) -> None:
        """Queues the end of the episode: ``metadata`` (must include ``success``) is merged into the episode attrs
        and ``complete`` is set True once every queued step of it is on disk. Adds ``num_inferences`` and
        ``wall_time_s`` (since begin_episode) unless given."""
        self._writer._check()
        if self._finished:
            raise RuntimeError(f"task {self.task_id} episode {self.episode_index}: finish() was already called.")
        meta = manifest_lib.to_json_compatible(dict(metadata), where="metadata")
        if "success" not in meta:
            raise ValueError("finish(metadata) needs 'success' (LIBERO's done flag; False if the episode failed).")
        clash = sorted(set(meta) & sf.RESERVED_EPISODE_ATTRS)
        if clash:
            raise ValueError(f"metadata keys {clash} are set by the store; rename them.")
        meta.setdefault("num_inferences", self._num_steps)
        meta.setdefault("wall_time_s", round(time.monotonic() - self._t0, 3))
        self._writer._put(("finish", self._sink, meta))
        self._finished = True
        self._writer._episode_finished(self._sink)
