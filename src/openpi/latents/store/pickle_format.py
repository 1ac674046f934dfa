"""The original pickle layout (before the zarr store), offered as an export / compatibility format.

``<out_dir>/inference_latents/task_{id}_{name}.pkl`` holds one task as an eager nested dict::

    {"task_id", "task_name", "language", "suite", ..., "manifest": {...},
     "episodes": {"episode_{k}": {"metadata": {...}, "rollout_steps": {"step_{t}": {key: np.ndarray | str | scalar}}}}}

``manifest`` is the run manifest (what the store keeps in manifest.json: capture_spec, preset, text_start,
segment_names, ...); the analysis needs it for model layer ids and the camera layout. Pickles written before it was
stored lack the key (the analysis then says how it labelled the layers).

Memory: a pickle is built and loaded whole. :class:`PickleTaskWriter` keeps every step of every finished episode of
the task in RAM and rewrites the whole file after each finished episode, so it needs about
``estimate_bytes(record) x inferences per episode x episodes`` of RAM (the text window alone at 3.5 MB/inference,
~50 inferences and 50 episodes is ~9 GB; full expert-0 captures are 60 MB/inference) and the rewrites cost
O(episodes^2) I/O. Use the zarr store (``LatentStoreWriter``) for anything but small captures. Reading a pickle
executes code from the file; ``load_inference_task_data`` opens one only with ``allow_pickle=True``.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from openpi.latents.store import format as sf
from openpi.latents.store.manifest import to_json_compatible
from openpi.latents.store.reader import materialize, open_store

PICKLE_DIR = "inference_latents"
_PICKLE_RE = re.compile(r"^task_(\d+)_.*\.pkl$")


def pickle_file_name(task_id: int, task_name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(task_name)).strip("_") or "task"
    return f"task_{int(task_id)}_{safe}.pkl"


def parse_pickle_task_id(path: pathlib.Path) -> int | None:
    m = _PICKLE_RE.match(path.name)
    return int(m.group(1)) if m else None


def write_pickle_atomic(path: pathlib.Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _step_value(key: str, value: Any) -> Any:
    value = sf.normalize_value(key, value)
    if isinstance(value, np.ndarray) and value.shape == ():
        return value[()]
    return value


class PickleEpisodeWriter:
    """One episode of a :class:`PickleTaskWriter`; same ``append_step`` / ``finish`` calls as the store's."""

    def __init__(self, task_writer: PickleTaskWriter, episode_index: int, attrs: dict[str, Any]):
        self._task_writer = task_writer
        self.episode_index = episode_index
        self._attrs = attrs
        self._steps: dict[str, dict[str, Any]] = {}
        self._t0 = time.monotonic()
        self._finished = False

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def append_step(self, record: Mapping[str, Any]) -> None:
        if self._finished:
            raise RuntimeError(f"episode {self.episode_index}: already finished.")
        if "t" not in record:
            raise ValueError(f"episode {self.episode_index}: a step record must include 't' (env timestep).")
        name = f"step_{int(record['t'])}"
        if name in self._steps:
            raise ValueError(f"episode {self.episode_index}: {name} was already recorded.")
        self._steps[name] = {k: _step_value(k, v) for k, v in record.items()}

    def finish(self, metadata: Mapping[str, Any]) -> None:
        if self._finished:
            raise RuntimeError(f"episode {self.episode_index}: finish() was already called.")
        meta = to_json_compatible(dict(metadata), where="metadata")
        if "success" not in meta:
            raise ValueError("finish(metadata) needs 'success' (LIBERO's done flag; False if the episode failed).")
        meta = {**self._attrs, **meta}
        meta.setdefault("num_inferences", len(self._steps))
        meta.setdefault("wall_time_s", round(time.monotonic() - self._t0, 3))
        meta.update({sf.EPISODE_COMMITTED: len(self._steps), sf.EPISODE_COMPLETE: True})
        self._finished = True
        self._task_writer._add_episode(self.episode_index, {"metadata": meta, "rollout_steps": self._steps})


class PickleTaskWriter:
    """Writes one task in the original pickle layout (see the module docstring for the memory cost).

    ``resume=True`` loads an existing file written by this class (unpickling it: only do so for your own output).
    ``manifest``: the run manifest, stored as ``data["manifest"]`` (also added to a resumed file that lacks one).
    """

    def __init__(
        self,
        out_dir: str | pathlib.Path,
        task: Mapping[str, Any],
        *,
        resume: bool = False,
        manifest: Mapping[str, Any] | None = None,
    ):
        missing = [k for k in sf.TASK_REQUIRED_ATTRS if k not in task]
        if missing:
            raise ValueError(f"task dict lacks {missing}; it needs {list(sf.TASK_REQUIRED_ATTRS)}.")
        info = to_json_compatible(dict(task), where="task")
        self.path = pathlib.Path(out_dir) / PICKLE_DIR / pickle_file_name(info["task_id"], info["task_name"])
        if self.path.exists():
            if not resume:
                raise FileExistsError(f"{self.path} exists; pass --resume to continue or choose a new --output-dir.")
            with open(self.path, "rb") as f:
                self.data: dict[str, Any] = pickle.load(f)  # our own output, resume requested
        else:
            self.data = {**info, "episodes": {}}
        if manifest is not None and not self.data.get("manifest"):
            self.data["manifest"] = to_json_compatible(dict(manifest), where="manifest")
        self._open: set[int] = set()

    @property
    def completed(self) -> set[int]:
        return {int(name.split("_", 1)[1]) for name in self.data["episodes"]}

    def begin_episode(self, episode_index: int, attrs: Mapping[str, Any] | None = None) -> PickleEpisodeWriter:
        k = int(episode_index)
        if k in self.completed or k in self._open:
            raise ValueError(f"{self.path}: episode {k} was already written or begun.")
        self._open.add(k)
        ep_attrs = {"episode_index": k, **to_json_compatible(dict(attrs or {}), where="attrs")}
        return PickleEpisodeWriter(self, k, ep_attrs)

    def _add_episode(self, k: int, episode: dict[str, Any]) -> None:
        self._open.discard(k)
        self.data["episodes"][f"episode_{k}"] = episode
        write_pickle_atomic(self.path, self.data)


def export_pickle(
    store_root: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    task_ids: Iterable[int] | None = None,
    *,
    include_incomplete: bool = False,
) -> list[pathlib.Path]:
    """Writes ``out_dir/inference_latents/task_{id}_{name}.pkl`` for each task of the store (one task in RAM at a
    time), each with the store's manifest; returns the written paths."""
    store = open_store(store_root)
    ids = store.task_ids() if task_ids is None else [int(t) for t in task_ids]
    paths = []
    for task_id in ids:
        data = materialize(store.task_data(task_id, include_incomplete=include_incomplete))
        data["manifest"] = dict(store.manifest)
        path = pathlib.Path(out_dir) / PICKLE_DIR / pickle_file_name(task_id, data["task_name"])
        write_pickle_atomic(path, data)
        paths.append(path)
    return paths


def pickle_files(path: pathlib.Path) -> dict[int, pathlib.Path]:
    """task_id -> pickle file, for a .pkl file, a directory of them, or a directory holding ``inference_latents/``."""
    if path.is_file():
        return {parse_pickle_task_id(path) if parse_pickle_task_id(path) is not None else -1: path}
    folder = path / PICKLE_DIR if (path / PICKLE_DIR).is_dir() else path
    out = {}
    for p in sorted(folder.glob("task_*.pkl")):
        task_id = parse_pickle_task_id(p)
        if task_id is not None:
            out[task_id] = p
    return out


def load_pickle_task(path: pathlib.Path, *, include_incomplete: bool = False) -> dict[str, Any]:
    """Unpickles one task file (executes code from the file: callers must have been allowed to)."""
    with open(path, "rb") as f:
        data = pickle.load(f)  # gated by allow_pickle in load_inference_task_data
    if not include_incomplete:
        episodes = data.get("episodes", {})
        data["episodes"] = {k: v for k, v in episodes.items() if v.get("metadata", {}).get("complete", True)}
    return data
