"""What the analysis reads: a uniform source over a store or openpi-style task dicts (pickles, in memory).

A *source* answers one-layer questions: ``read(task, episode, key, layer=l, steps=[...])`` returns that key's layer
``l`` across the given rollout steps as one array ``[steps, ...]`` (the layer axis removed). Over the zarr store this
reads only that layer's chunks (:meth:`LatentStore.read_array`); over pickled / in-memory task dicts (already in RAM)
it stacks the steps. Every source also has the run ``manifest`` (a store's; a pickle's ``data["manifest"]``; {} when
there is none) and a ``root`` naming where the data came from.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from openpi.latents import schema


class DictSource:
    """openpi-style nested dicts (``{task_id: task_data}``; pickles or :func:`materialize` output), already in RAM."""

    def __init__(self, tasks: Mapping[int, Mapping[str, Any]], manifest: Mapping[str, Any] | None = None):
        """``manifest``: the run manifest; default: the ``"manifest"`` a task dict carries (pickles written since
        the pickle format stored it), else none (then layer ids and camera layout are inferred and flagged)."""
        self.tasks = {int(k): v for k, v in tasks.items()}
        if manifest is None:
            manifest = next((v["manifest"] for v in self.tasks.values() if v.get("manifest")), None)
        self.manifest = dict(manifest or {})
        self.root = "<in-memory task data>"

    def task_ids(self) -> list[int]:
        return sorted(self.tasks)

    def task_info(self, t: int) -> dict[str, Any]:
        return {k: v for k, v in self.tasks[t].items() if k not in ("episodes", "manifest")}

    def _ep(self, t: int, k: int) -> Mapping[str, Any]:
        return self.tasks[t]["episodes"][f"episode_{k}"]

    def _steps(self, t: int, k: int) -> list[Mapping[str, Any]]:
        steps = self._ep(t, k)["rollout_steps"]
        return [steps[name] for name in sorted(steps, key=lambda s: int(s.split("_", 1)[1]))]

    def episode_indices(self, t: int) -> list[int]:
        return sorted(int(name.split("_", 1)[1]) for name in self.tasks[t]["episodes"])

    def metadata(self, t: int, k: int) -> dict[str, Any]:
        return dict(self._ep(t, k).get("metadata", {}))

    def step_t(self, t: int, k: int) -> list[int]:
        return sorted(int(name.split("_", 1)[1]) for name in self._ep(t, k)["rollout_steps"])

    def fields(self, t: int, k: int) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        out: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
        for step in self._steps(t, k):
            for key, v in step.items():
                if key not in out and isinstance(v, np.ndarray):
                    out[key] = (v.shape, schema.dims_for(key, v.ndim))
                elif key not in out and isinstance(v, str):  # per-step strings (prompt, cf_prompt), as a store has
                    out[key] = ((), ())
        return out

    def present_steps(self, t: int, k: int, key: str) -> list[int]:
        return [i for i, s in enumerate(self._steps(t, k)) if key in s]

    def read(self, t: int, k: int, key: str, layer: int | None = None, steps: Sequence[int] | None = None):
        all_steps = self._steps(t, k)
        idx = range(len(all_steps)) if steps is None else steps
        arr = np.stack([np.asarray(all_steps[i][key]) for i in idx])
        if layer is not None:
            arr = np.take(arr, layer, axis=1 + schema.dims_for(key, arr.ndim - 1).index("layer"))
        return require_finite(arr, t, k, key, list(idx), layer)


class NonFiniteValueError(ValueError):
    """Stored latents hold NaN or inf (the message names the task, episode, key, rollout step and layer)."""


def require_finite(arr: np.ndarray, t: int, k: int, key: str, steps: Sequence[int], layer: int | None) -> np.ndarray:
    """``arr`` ([step, ...], rows for rollout steps ``steps``) unless a float value is NaN/inf: then an error naming
    where, instead of a statistic failing later with "Input X contains NaN" and no episode."""
    if arr.size == 0 or (arr.dtype.kind != "f" and str(arr.dtype) != "bfloat16"):
        return arr
    finite = np.isfinite(arr.astype(np.float32, copy=False)).reshape(len(arr), -1).all(axis=1)
    if finite.all():
        return arr
    bad = [int(steps[i]) for i in np.flatnonzero(~finite)]
    raise NonFiniteValueError(
        f"task {t} episode {k}: {key!r}" + ("" if layer is None else f" layer {layer}") + f" holds NaN or inf at "
        f"rollout step(s) {bad[:10]}{' ...' if len(bad) > 10 else ''}; the collection recorded non-finite values "
        "there (e.g. a client state far outside the normalisation). Re-collect that episode, or analyse the other "
        "episodes with --task-ids."
    )


class StoreSource:
    """A :class:`LatentStore` (complete episodes only unless ``include_incomplete``), optionally some tasks only."""

    def __init__(self, store, task_ids: Sequence[int] | None = None, include_incomplete: bool = False):
        self.store = store
        self.manifest = dict(store.manifest)
        self.root = str(store.root)
        self._ids = store.task_ids() if task_ids is None else [int(t) for t in task_ids]
        self._incomplete = include_incomplete

    def task_ids(self) -> list[int]:
        return list(self._ids)

    def task_info(self, t: int) -> dict[str, Any]:
        return dict(self.store.task_info(t))

    def episode_indices(self, t: int) -> list[int]:
        return self.store.episode_indices(t, include_incomplete=self._incomplete)

    def metadata(self, t: int, k: int) -> dict[str, Any]:
        return self.store.episode(t, k).metadata

    def step_t(self, t: int, k: int) -> list[int]:
        return list(self.store.episode(t, k).step_t)

    def fields(self, t: int, k: int) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        return {key: (f.shape, f.dims) for key, f in self.store.episode(t, k).fields.items()}

    def present_steps(self, t: int, k: int, key: str) -> list[int]:
        return self.store.episode(t, k).present_steps(key)

    def read(self, t: int, k: int, key: str, layer: int | None = None, steps: Sequence[int] | None = None):
        arr = self.store.read_array(t, k, key, layer=layer, steps=None if steps is None else list(steps))
        return require_finite(arr, t, k, key, self.present_steps(t, k, key) if steps is None else list(steps), layer)


def make_source(
    data: Any, *, task_ids: Sequence[int] | None = None, allow_pickle: bool = False, manifest=None, skip_damaged=False
):
    """A source over a store path, a pickle path, a ``LatentStore``, a (lazy or eager) task dict or ``{id: task}``.
    A store path with damaged episodes is refused (StoreCorruptionError listing them) unless ``skip_damaged``."""
    from openpi.latents.store import loading, location
    from openpi.latents.store.reader import LatentStore, open_store
    from openpi.latents.store.views import TaskData, TasksView

    if isinstance(data, (str, pathlib.Path, location.ObjectPath)):
        if loading.detect_format(location.as_path(data)) == "store":
            opened = open_store(data)
            opened.require_intact(skip_damaged=skip_damaged)
            return StoreSource(opened, task_ids)
        data = loading.load_inference_task_data(data, None, format="pickle", allow_pickle=allow_pickle)
    if isinstance(data, LatentStore):
        return StoreSource(data, task_ids)
    if isinstance(data, TaskData):  # the store behind a lazy task view
        return StoreSource(data.store, [data["task_id"]], data.include_incomplete)
    if isinstance(data, TasksView):
        return StoreSource(data.store, task_ids, data.include_incomplete)
    if isinstance(data, Mapping) and "episodes" in data:
        data = {int(data.get("task_id", 0)): data}
    if isinstance(data, Mapping):
        tasks = {t: v for t, v in data.items() if task_ids is None or int(t) in set(task_ids)}
        return DictSource(tasks, manifest)
    raise TypeError(f"cannot analyse a {type(data).__name__}: pass a store path, task data or a LatentStore")
