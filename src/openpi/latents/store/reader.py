"""Lazy reader of the latent store (layout in ``format``).

``open_store(root)`` scans the directory tree (one small JSON read per task and episode group, no array reads) and
returns a :class:`LatentStore`. Arrays are opened on first use and read one rollout step (or one layer) at a time.
Readers trust the episode's commit record (``commit``), never the array shapes: after a crash mid-step an array
already counts the half-written step. Every read checks that the chunk file of each row it reads exists (a missing
file would otherwise read back as zeros) and raises :class:`MissingChunkError` naming it; codec and metadata errors
are raised as :class:`StoreCorruptionError` naming the array, task and episode. Opening an array compares its
``zarr.json`` (dtype, byte order, per-step shape) with the commit record's field and refuses a mismatch. In format-3
episodes every whole chunk file a read loads (all unsharded keys; whole rows of sharded keys) is checked against its
bound checksum (``checksums``: content and place), so a chunk swapped with another row's or episode's raises
:class:`~openpi.latents.store.checksums.ChunkChecksumError`; a one-layer read of a sharded key reads part of a file
and relies on zarr's CRC-32C (bit flips), ``verify`` checks the whole file. Episodes whose metadata is damaged are
left out of the listings (with a warning) and reported by :meth:`LatentStore.damaged_episodes`.

The store is read as a snapshot taken at ``open_store``; reopen it to see episodes written since.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from openpi.latents.store import (
    bf16,  # noqa: F401 - registers bfloat16 with zarr
    location,
)
from openpi.latents.store import checksums as checksums_lib
from openpi.latents.store import format as sf
from openpi.latents.store.array_checks import metadata_mismatch
from openpi.latents.store.commit import read_commit
from openpi.latents.store.format import (
    DamagedEpisodeError,
    MissingChunkError,
    StoreCorruptionError,
    StoreFormatError,
    read_group_attrs,
    require_attrs,
    scan_episode_dirs,
)
from openpi.latents.store.manifest import RunManifest
from openpi.latents.store.views import TaskData, TasksView

logger = logging.getLogger(__name__)


class EpisodeReader:
    """One episode: its attrs snapshot and lazily opened arrays."""

    def __init__(self, path: location.StorePath, task_id: int, episode_index: int):
        self.path = path
        self.task_id = task_id
        self.episode_index = episode_index
        self.record, group_attrs = read_commit(path)
        self.complete = self.record.complete
        self.committed = self.record.committed_steps
        self.fields = self.record.fields
        self.step_t = self.record.step_t
        self.sparse = self.record.sparse
        self.strings = self.record.strings
        static = {k: v for k, v in group_attrs.items() if k not in sf.RESERVED_EPISODE_ATTRS}
        self.attrs = {
            **static,
            **self.record.attrs,
            sf.EPISODE_COMMITTED: self.committed,
            sf.EPISODE_COMPLETE: self.complete,
        }
        self._arrays: dict[str, zarr.Array] = {}

    @property
    def where(self) -> str:
        return f"task {self.task_id} episode {self.episode_index}"

    # --- metadata -----------------------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        """Episode attrs (caller attrs, finish() metadata, committed_steps, complete), without the bookkeeping."""
        return dict(self.attrs)

    def keys(self) -> list[str]:
        return list(self.fields)

    def keys_at(self, step: int) -> list[str]:
        return [k for k, f in self.fields.items() if not f.optional or step in self.sparse.get(k, ())]

    def present_steps(self, key: str) -> list[int]:
        """Rollout-step indices (0..committed-1) at which ``key`` was recorded."""
        spec = self._spec(key)
        if not spec.optional:
            return list(range(self.committed))
        return [s for s in self.sparse.get(key, []) if s < self.committed]

    # --- reading ------------------------------------------------------------------------------------
    def _spec(self, key: str) -> sf.FieldSpec:
        try:
            return self.fields[key]
        except KeyError:
            raise KeyError(f"{self.path}: no key {key!r}; this episode has {sorted(self.fields)}.") from None

    def open_array(self, key: str) -> zarr.Array:
        """The zarr array of ``key`` (opened once); StoreCorruptionError naming it if missing or corrupt."""
        return self._array(key)

    def _array(self, key: str) -> zarr.Array:
        arr = self._arrays.get(key)
        if arr is None:
            try:
                if self.record.checksums_bind_place:
                    place = f"{checksums_lib.episode_place(self.path)}/{key}"
                    store = checksums_lib.checked_store(self.path / key, place, self.record.checksums[key])
                else:
                    store = location.zarr_store(self.path / key, read_only=True)
                arr = zarr.open_array(store=store, mode="r", zarr_format=3)
            except FileNotFoundError:
                raise StoreCorruptionError(
                    f"{self.path / key}: array of key {key!r} ({self.where}) is missing; the store is damaged."
                ) from None
            except Exception as e:
                raise self._corrupt(key, "opening", e) from e
            problem = metadata_mismatch(self._spec(key), arr, len(self.present_steps(key)))
            if problem:
                raise StoreCorruptionError(
                    f"{self.path / key / 'zarr.json'}: the array metadata of key {key!r} ({self.where}) disagrees with "
                    f"its commit record: {problem}. The zarr.json was edited or replaced; restore it or delete the "
                    "episode folder and --resume."
                )
            self._arrays[key] = arr
        return arr

    def _corrupt(self, key: str, doing: str, e: BaseException) -> StoreCorruptionError:
        return StoreCorruptionError(
            f"{self.path / key}: {doing} key {key!r} of {self.where} failed: {type(e).__name__}: {e}. The stored "
            f"array is corrupt; `python -m openpi.latents.store verify {self.path.parent.parent}` lists the damage."
        )

    def missing_chunks(self, key: str, rows: Sequence[int] | None = None) -> list[tuple[int, location.StorePath]]:
        """(row, path) of the chunk files of committed ``rows`` (None: all) of ``key`` that do not exist. Format-1
        episodes check only keys where an absent file cannot be a legitimate all-zero row."""
        spec = self._spec(key)
        if self.record.checksums is None and not sf.legacy_row_checkable(spec):
            return []
        rows = range(len(self.present_steps(key))) if rows is None else rows
        chunks = {row: chunk for row in rows if (chunk := sf.row_chunk_key(spec, row)) is not None}
        missing = set(location.missing_files(self.path, list(chunks.values())))
        return [(row, self.path / chunk) for row, chunk in chunks.items() if chunk in missing]

    def _check_present(self, key: str, rows: list[int] | slice) -> None:
        if isinstance(rows, slice):
            rows = list(range(*rows.indices(len(self.present_steps(key)))))
        missing = self.missing_chunks(key, rows)
        if missing:
            row, path = missing[0]
            step = self.present_steps(key)[row]
            raise MissingChunkError(
                f"{path}: missing chunk file of key {key!r}, row {row} (rollout step {step}, step_{self.step_t[step]})"
                f" of {self.where}" + (f", and {len(missing) - 1} more" if len(missing) > 1 else "") + "; this "
                "committed data is lost (zarr would read it as zeros). Run `python -m openpi.latents.store verify "
                f"{self.path.parent.parent}`, then delete the episode folder {self.path} and --resume to re-run it."
            )

    def _rows(self, key: str, steps: int | slice | Sequence[int] | None) -> tuple[list[int] | slice, bool]:
        """Array rows for rollout-step indices ``steps``; returns (rows, scalar_step)."""
        spec = self._spec(key)
        present = self.present_steps(key)
        if steps is None:
            return slice(0, len(present)), False
        if isinstance(steps, slice):
            steps = range(self.committed)[steps]
        scalar = isinstance(steps, (int, np.integer))
        wanted = [int(steps)] if scalar else [int(s) for s in steps]
        wanted = [s + self.committed if s < 0 else s for s in wanted]
        bad = [s for s in wanted if not 0 <= s < self.committed]
        if bad:
            raise IndexError(f"{self.path}: rollout steps {bad} out of range; {self.committed} steps are committed.")
        if not spec.optional:
            rows: list[int] | slice = wanted
        else:
            row_of = {s: i for i, s in enumerate(present)}
            absent = [s for s in wanted if s not in row_of]
            if absent:
                raise KeyError(
                    f"{self.path}: key {key!r} was not recorded at rollout steps {absent}; it is at {present}."
                )
            rows = [row_of[s] for s in wanted]
        if isinstance(rows, list) and rows and rows == list(range(rows[0], rows[-1] + 1)):
            rows = slice(rows[0], rows[-1] + 1)
        return rows, scalar

    def read(
        self, key: str, *, layer: int | Sequence[int] | None = None, steps: int | slice | Sequence[int] | None = None
    ) -> np.ndarray:
        """Rows of ``key`` for rollout-step indices ``steps`` (None: all committed), optionally one layer."""
        spec = self._spec(key)
        rows, scalar = self._rows(key, steps)
        selection: list[Any] = [rows] + [slice(None)] * len(spec.shape)
        if layer is not None:
            axis = spec.layer_axis
            if axis is None:
                raise ValueError(
                    f"{self.path}: key {key!r} has no layer axis (dims {list(spec.dims)}); pass layer=None."
                )
            n_layers = spec.shape[axis]
            layers = [layer] if isinstance(layer, (int, np.integer)) else list(layer)
            layers = [int(x) + n_layers if int(x) < 0 else int(x) for x in layers]
            if any(not 0 <= x < n_layers for x in layers):
                raise IndexError(f"{self.path}: layer {layer} out of range for {key!r} with {n_layers} stored layers.")
            selection[1 + axis] = layers[0] if isinstance(layer, (int, np.integer)) else layers
        self._check_present(key, rows)
        arr = self._array(key)
        try:
            if isinstance(rows, slice) and all(not isinstance(s, list) for s in selection):
                data = arr[tuple(selection)]
            else:
                data = arr.oindex[tuple(selection)]
        except Exception as e:
            raise self._corrupt(key, f"reading rows {rows} of", e) from e
        data = np.asarray(data)
        if scalar:
            data = data[0]
        if spec.is_string:
            table = np.asarray(self.strings.get(key, []), dtype=object)
            data = table[data.astype(np.int64)] if data.ndim else table[int(data)]
        return data

    def read_step_value(self, key: str, step: int) -> Any:
        value = self.read(key, steps=step)
        if self._spec(key).shape == ():
            return str(value) if self._spec(key).is_string else value[()]
        return value


class LatentStore:
    """A latent store opened for reading (see :func:`open_store`)."""

    def __init__(self, root: str | pathlib.Path | location.ObjectPath):
        self.root = location.as_path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such latent store directory (or an empty prefix).")
        self.manifest, self.attrs = sf.read_store_manifest(self.root)  # the manifest's JSON, as stored
        self.run_manifest = RunManifest.from_json(self.manifest)  # what readers read
        self._dirs = scan_episode_dirs(self.root)
        self._tasks: dict[int, dict[str, Any]] = {}
        self._episodes: dict[tuple[int, int], EpisodeReader] = {}
        self._damaged: dict[tuple[int, int | None], StoreFormatError] = {}  # (task, episode or None: the task)
        self._excluded: set[tuple[int, int]] = set()  # damaged episodes skipped by require_intact(skip_damaged=True)

    def _note_damage(self, where: tuple[int, int | None], e: StoreFormatError) -> None:
        if where not in self._damaged:
            self._damaged[where] = e
            logger.warning("Skipping a damaged %s: %s", "task" if where[1] is None else "episode", e)

    def task_ids(self) -> list[int]:
        """Tasks whose group is readable (damaged ones are skipped with a warning; see damaged_episodes)."""
        ok = []
        for t in sorted(self._dirs):
            try:
                self.task_info(t)
                ok.append(t)
            except StoreFormatError as e:
                self._note_damage((t, None), e)
        return ok

    def task_info(self, task_id: int) -> dict[str, Any]:
        task_id = int(task_id)
        if task_id not in self._tasks:
            if task_id not in self._dirs:
                raise KeyError(f"{self.root}: no task {task_id}; tasks are {self.task_ids()}.")
            path = self.root / sf.task_group_name(task_id)
            attrs = read_group_attrs(path)
            require_attrs(path, attrs, sf.TASK_REQUIRED_ATTRS, "task")
            self._tasks[task_id] = attrs
        return self._tasks[task_id]

    def episode(self, task_id: int, episode_index: int) -> EpisodeReader:
        """The episode's reader; DamagedEpisodeError (naming the file) if its metadata is damaged."""
        key = (int(task_id), int(episode_index))
        if key not in self._episodes:
            path = self._dirs.get(key[0], {}).get(key[1])
            if path is None:
                raise KeyError(f"{self.root}: no episode {key[1]} in task {key[0]}.")
            self._episodes[key] = EpisodeReader(path, *key)
        return self._episodes[key]

    def _readable(self, task_id: int, k: int) -> EpisodeReader | None:
        if (int(task_id), int(k)) in self._damaged:  # stays damaged in this snapshot (a live writer may fix it)
            return None
        try:
            return self.episode(task_id, k)
        except DamagedEpisodeError as e:
            self._note_damage((task_id, k), e)
            return None

    def episode_indices(self, task_id: int, *, include_incomplete: bool = False) -> list[int]:
        """Episodes of ``task_id`` (complete ones unless ``include_incomplete``); damaged ones are skipped."""
        self.task_info(task_id)
        out = []
        for k in sorted(self._dirs[int(task_id)]):
            ep = None if (int(task_id), k) in self._excluded else self._readable(task_id, k)
            if ep is not None and (include_incomplete or ep.complete):
                out.append(k)
        return out

    def completed_episodes(self) -> set[tuple[int, int]]:
        return {(t, k) for t in self.task_ids() for k in self.episode_indices(t)}

    def damaged_episodes(self) -> dict[tuple[int, int | None], StoreFormatError]:
        """(task, episode) -> error, for every episode (episode None: task group) whose metadata is damaged."""
        for t in self.task_ids():
            for k in self._dirs[t]:
                self._readable(t, k)
        return dict(self._damaged)

    def integrity_problems(self) -> dict[tuple[int, int | None], str]:
        """Cheap checks of what the complete-only view would lose: damaged task groups, damaged episodes that may
        have finished, and complete episodes with a missing chunk file of a committed row (one stat per file)."""
        problems: dict[tuple[int, int | None], str] = {}
        for where, e in self.damaged_episodes().items():
            if where[1] is None or getattr(e, "may_be_complete", True):
                problems[where] = str(e)
        for t in self.task_ids():
            for k in self.episode_indices(t):
                ep = self.episode(t, k)
                missing = [p for key in ep.keys() for _, p in ep.missing_chunks(key)]
                if missing:
                    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                    problems[(t, k)] = f"{ep.where}: missing chunk file {missing[0]}{more}"
        return problems

    def require_intact(
        self, *, skip_damaged: bool = False, fix: str | None = None
    ) -> dict[tuple[int, int | None], str]:
        """Raises StoreCorruptionError listing :meth:`integrity_problems` unless there are none; with
        ``skip_damaged`` leaves the damaged episodes out of this store's listings instead (and returns them).
        ``fix``: the caller's advice in the message (default: the analysis CLI's ``--skip-damaged``)."""
        problems = self.integrity_problems()
        if problems and not skip_damaged:
            fix = fix or "Pass --skip-damaged (skip_damaged=True) to analyse the rest"
            raise StoreCorruptionError(
                f"{self.root} is damaged ({len(problems)} episodes or tasks):\n  "
                + "\n  ".join(problems.values())
                + f"\n{fix}, or see `python -m openpi.latents.store verify {self.root}`."
            )
        for t, k in problems:
            if k is not None:
                self._excluded.add((t, k))
        if problems:
            logger.warning("Skipping %d damaged episodes/tasks of %s: %s", len(problems), self.root, list(problems))
        return problems

    def read_array(
        self,
        task_id: int,
        episode: int,
        key: str,
        layer: int | Sequence[int] | None = None,
        steps: int | slice | Sequence[int] | None = None,
    ) -> np.ndarray:
        """``key`` across rollout steps as [step, ...]; ``layer`` selects on the key's layer axis (reading only
        that layer's chunks), ``steps`` are rollout-step indices (0..committed_steps-1, not env timesteps)."""
        return self.episode(task_id, episode).read(key, layer=layer, steps=steps)

    def task_data(self, task_id: int, *, include_incomplete: bool = False) -> TaskData:
        return TaskData(self, int(task_id), include_incomplete)

    def tasks(self, *, include_incomplete: bool = False) -> TasksView:
        return TasksView(self, include_incomplete)


def open_store(root: str | pathlib.Path | location.ObjectPath) -> LatentStore:
    """Opens a latent store (a directory, ``s3://bucket/prefix`` or ``gs://...``) for lazy reading; raises
    StoreFormatError naming the path if it is not one."""
    return LatentStore(root)


def completed_episodes(root: str | pathlib.Path | location.ObjectPath) -> set[tuple[int, int]]:
    """{(task_id, episode_index)} of the episodes marked complete in the store at ``root`` (empty if none)."""
    root = location.as_path(root)
    if not root.exists() or not any(root.iterdir()):
        return set()
    return open_store(root).completed_episodes()


def materialize(value: Any) -> Any:
    """Eager copy of a lazy view (nested Mappings -> dicts, arrays read)."""
    if isinstance(value, Mapping):
        return {k: materialize(value[k]) for k in value}
    return value


__all__ = [
    "EpisodeReader",
    "LatentStore",
    "StoreFormatError",
    "completed_episodes",
    "materialize",
    "open_store",
]
