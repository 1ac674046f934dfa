"""The latent store: a streaming, crash-safe, resumable zarr v3 directory of latent records, and its readers.

Modules (each imports only those before it): ``location`` (a local directory or ``s3://`` / ``gs://`` object storage),
``bf16`` (bfloat16 for zarr), ``manifest`` (the run manifest), ``format`` (on-disk layout), ``commit`` (the per-episode
commit record), ``lock`` (the writer lock), ``opening`` (the checks before writing, what resume deletes),
``episode_writer`` + ``writer`` (the writer thread), ``views`` + ``reader`` (lazy reading), ``verify`` (full integrity
check, ``python -m openpi.latents.store verify <store>``), ``pickle_format`` (the original pickle layout), ``loading``
(one entry point over both), ``bench`` (``python -m openpi.latents.store.bench``). The record keys themselves are
defined in :mod:`openpi.latents.schema`.

Use::

    with store.LatentStoreWriter.create_or_open(out_dir, manifest, resume=False) as writer:
        ep = writer.begin_episode(task, k, {"seed": 7})
        ep.append_step({"t": t, **record})
        ep.finish({"success": done})
    data = store.load_inference_task_data(out_dir, task_id=0)  # lazy nested mappings
"""

from openpi.latents.schema import estimate_bytes, format_bytes
from openpi.latents.store.episode_writer import EpisodeWriter
from openpi.latents.store.format import (
    DamagedEpisodeError,
    MissingChunkError,
    StoreCorruptionError,
    StoreFormatError,
    is_store,
)
from openpi.latents.store.loading import detect_format, load_inference_task_data
from openpi.latents.store.location import ObjectPath, ObjectStoreError
from openpi.latents.store.lock import StoreLockedError
from openpi.latents.store.manifest import MANIFEST_VERSION, RunManifest
from openpi.latents.store.opening import check_writable
from openpi.latents.store.pickle_format import PickleTaskWriter, export_pickle
from openpi.latents.store.reader import EpisodeReader, LatentStore, completed_episodes, materialize, open_store
from openpi.latents.store.views import TaskData, TasksView
from openpi.latents.store.writer import LatentStoreWriteError, LatentStoreWriter, create_or_open

__all__ = [
    "MANIFEST_VERSION",
    "DamagedEpisodeError",
    "EpisodeReader",
    "EpisodeWriter",
    "LatentStore",
    "LatentStoreWriteError",
    "LatentStoreWriter",
    "MissingChunkError",
    "ObjectPath",
    "ObjectStoreError",
    "PickleTaskWriter",
    "RunManifest",
    "StoreCorruptionError",
    "StoreFormatError",
    "StoreLockedError",
    "TaskData",
    "TasksView",
    "check_writable",
    "completed_episodes",
    "create_or_open",
    "detect_format",
    "estimate_bytes",
    "export_pickle",
    "format_bytes",
    "is_store",
    "load_inference_task_data",
    "materialize",
    "open_store",
]
