"""Lazy reader of the latent store (layout in ``format``).

``open_store(root)`` scans the directory tree (one small JSON read per task and episode group, no array reads) and
returns a :class:`LatentStore`. Arrays are opened on first use and read one rollout step (or one layer) at a time.
Readers trust the episode attr ``committed_steps``, never the array shapes: after a crash mid-step an array already
counts the half-written step.

The store is read as a snapshot taken at ``open_store``; reopen it to see episodes written since.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from openpi.latents.store import bf16  # noqa: F401 - registers bfloat16 with zarr
from openpi.latents.store import format as sf
from openpi.latents.store.format import StoreFormatError, read_group_attrs, require_attrs, scan_episode_dirs
from openpi.latents.store.views import TaskData, TasksView

_INTERNAL_ATTRS = frozenset({sf.EPISODE_FIELDS, sf.EPISODE_SPARSE, sf.EPISODE_STRINGS, sf.EPISODE_STEP_T})


class EpisodeReader:
    """One episode: its attrs snapshot and lazily opened arrays."""

    def __init__(self, path: pathlib.Path, task_id: int, episode_index: int):
        self.path = path
        self.task_id = task_id
        self.episode_index = episode_index
        self.attrs = read_group_attrs(path)
        require_attrs(path, self.attrs, [sf.EPISODE_COMMITTED, sf.EPISODE_COMPLETE], "episode")
        self.complete = bool(self.attrs[sf.EPISODE_COMPLETE])
        self.committed = int(self.attrs[sf.EPISODE_COMMITTED])
        fields_json = self.attrs.get(sf.EPISODE_FIELDS, {})
        self.fields = {k: sf.FieldSpec.from_json(k, v) for k, v in fields_json.items()}
        self.step_t = [int(t) for t in self.attrs.get(sf.EPISODE_STEP_T, [])][: self.committed]
        if len(self.step_t) != self.committed:
            raise StoreFormatError(f"{path}: {sf.EPISODE_STEP_T} has fewer entries than {sf.EPISODE_COMMITTED}.")
        self.sparse = {k: [int(s) for s in v] for k, v in self.attrs.get(sf.EPISODE_SPARSE, {}).items()}
        self.strings = {k: list(v) for k, v in self.attrs.get(sf.EPISODE_STRINGS, {}).items()}
        self._arrays: dict[str, zarr.Array] = {}

    # --- metadata -----------------------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        """Episode attrs without the store's bookkeeping (fields, step_t, sparse_steps, string_tables)."""
        return {k: v for k, v in self.attrs.items() if k not in _INTERNAL_ATTRS}

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

    def _array(self, key: str) -> zarr.Array:
        arr = self._arrays.get(key)
        if arr is None:
            try:
                arr = zarr.open_array(store=str(self.path / key), mode="r", zarr_format=3)
            except FileNotFoundError:
                raise StoreFormatError(f"{self.path / key}: array of key {key!r} is missing (store corrupt).") from None
            self._arrays[key] = arr
        return arr

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
        arr = self._array(key)
        if isinstance(rows, slice) and all(not isinstance(s, list) for s in selection):
            data = arr[tuple(selection)]
        else:
            data = arr.oindex[tuple(selection)]
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

    def __init__(self, root: str | pathlib.Path):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such latent store directory.")
        self.manifest, self.attrs = sf.read_store_manifest(self.root)
        self._dirs = scan_episode_dirs(self.root)
        self._tasks: dict[int, dict[str, Any]] = {}
        self._episodes: dict[tuple[int, int], EpisodeReader] = {}

    def task_ids(self) -> list[int]:
        return sorted(self._dirs)

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
        key = (int(task_id), int(episode_index))
        if key not in self._episodes:
            path = self._dirs.get(key[0], {}).get(key[1])
            if path is None:
                raise KeyError(f"{self.root}: no episode {key[1]} in task {key[0]}.")
            self._episodes[key] = EpisodeReader(path, *key)
        return self._episodes[key]

    def episode_indices(self, task_id: int, *, include_incomplete: bool = False) -> list[int]:
        self.task_info(task_id)
        ks = sorted(self._dirs[int(task_id)])
        return [k for k in ks if include_incomplete or self.episode(task_id, k).complete]

    def completed_episodes(self) -> set[tuple[int, int]]:
        return {(t, k) for t in self.task_ids() for k in self.episode_indices(t)}

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


def open_store(root: str | pathlib.Path) -> LatentStore:
    """Opens a latent store for lazy reading; raises StoreFormatError naming the path if it is not one."""
    return LatentStore(root)


def completed_episodes(root: str | pathlib.Path) -> set[tuple[int, int]]:
    """{(task_id, episode_index)} of the episodes marked complete in the store at ``root`` (empty if none)."""
    root = pathlib.Path(root)
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
