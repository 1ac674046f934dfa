"""``load_inference_task_data``: the notebook entry point over either storage format."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any, Literal

from openpi.latents.store import location, pickle_format
from openpi.latents.store.format import StoreFormatError
from openpi.latents.store.reader import open_store

_PICKLE_WARNING = (
    "unpickling executes arbitrary code from the file, so pickles are opened only with allow_pickle=True; pass it "
    "only for files you trust (the zarr store needs no such trust)."
)


def detect_format(path: location.StorePath) -> Literal["store", "pickle"]:
    if location.is_remote(path):  # pickles are local files only
        if (path / "zarr.json").exists():
            return "store"
        raise StoreFormatError(f"{path}: no latent store there (no zarr.json under this prefix).")
    if path.is_dir() and (path / "zarr.json").exists():
        return "store"
    if path.is_file() and path.suffix == ".pkl":
        return "pickle"
    if path.is_dir() and pickle_format.pickle_files(path):
        return "pickle"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory.")
    raise StoreFormatError(
        f"{path}: neither a latent store (a directory with zarr.json and manifest.json) nor pickles "
        f"({pickle_format.PICKLE_DIR}/task_<id>_<name>.pkl)."
    )


def load_inference_task_data(
    path: str | pathlib.Path | location.ObjectPath,
    task_id: int | None = None,
    *,
    format: Literal["auto", "store", "pickle"] = "auto",  # the documented argument name
    allow_pickle: bool = False,
    include_incomplete: bool = False,
) -> Mapping[str, Any] | Mapping[int, Mapping[str, Any]]:
    """The original nested task structure: ``data["episodes"]["episode_0"]["rollout_steps"]["step_15"][key]``.

    ``task_id`` int: that task. ``task_id`` None: a mapping task_id -> task structure over all tasks. From a store
    everything is lazy (arrays are read on access, one step of one key at a time); from pickles it is eager and
    needs ``allow_pickle=True``. Only complete episodes appear unless ``include_incomplete``. ``path`` may be an
    ``s3://bucket/prefix`` or ``gs://bucket/prefix`` URL (stores only; see ``location`` for credentials/endpoint).
    """
    path = location.as_path(path)
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "store":
        store = open_store(path)
        if task_id is None:
            return store.tasks(include_incomplete=include_incomplete)
        return store.task_data(task_id, include_incomplete=include_incomplete)
    if fmt != "pickle":
        raise ValueError(f"format must be 'auto', 'store' or 'pickle', got {format!r}.")
    if not allow_pickle:
        raise PermissionError(f"{path} holds pickles: {_PICKLE_WARNING}")
    files = pickle_format.pickle_files(path)
    if task_id is None:
        return {
            tid: pickle_format.load_pickle_task(p, include_incomplete=include_incomplete) for tid, p in files.items()
        }
    if path.is_file():
        data = pickle_format.load_pickle_task(path, include_incomplete=include_incomplete)
        if int(data.get("task_id", task_id)) != int(task_id):
            raise KeyError(f"{path} holds task {data.get('task_id')}, not task {task_id}.")
        return data
    if int(task_id) not in files:
        raise KeyError(f"{path}: no pickle for task {task_id}; found tasks {sorted(files)}.")
    return pickle_format.load_pickle_task(files[int(task_id)], include_incomplete=include_incomplete)
