"""Streaming, crash-safe, resumable latent store (zarr v3): the writer.

Use::

    with LatentStoreWriter.create_or_open(out_dir, manifest, resume=args.resume) as writer:
        done = writer.completed            # {(task_id, episode_index)} already in the store
        ep = writer.begin_episode(task, k, {"init_state_index": k, "seed": 7, "prompt": task["language"]})
        for ...: ep.append_step({"t": t, "actions": ..., **latents})   # blocks only when the queue is full
        ep.finish({"success": done, "total_steps": t, "error": None})

One background thread does all writing, fed by a bounded queue; a failure there is re-raised (as
:class:`LatentStoreWriteError`) by the next writer call and by ``close()``. Each step's arrays are written first, then
the episode's commit record ``commit.json`` (one atomic write, with the crc32c of every chunk file; see ``commit``), so
a crash at any point leaves every committed step and every finished episode intact; the unfinished episode stays
``complete=False`` and resuming deletes it. One writer per store: ``create_or_open`` takes ``<root>/writer.lock`` (see
``lock``) and ``close`` releases it; the checks before opening are in ``opening``. The directory the caller gives is
never removed or recreated (its mode, owner, setgid bit, mount or symlink stay). The layout is documented in ``format``;
reading is ``reader`` / ``loading``; the pickle compat format is ``pickle_format``. The root is a local directory
(zarr's LocalStore writes each file by temp file + rename) or a prefix on object storage (``s3://``, ``gs://``; zarr's
FsspecStore writes each object in one PUT, atomic there; see ``location``): the crash story needs only that each file
appears whole or not at all.
"""

from __future__ import annotations

import datetime
import logging
import pathlib
import queue
import threading
from collections.abc import Collection, Mapping
from typing import Any

import zarr

from openpi.latents.store import (
    bf16,  # noqa: F401 - registers bfloat16 with zarr
    location,
)
from openpi.latents.store import format as sf
from openpi.latents.store import manifest as manifest_lib
from openpi.latents.store.episode_writer import (
    ChecksumFsspecStore,
    ChecksumStore,
    EpisodeSink,
    EpisodeWriter,
    checksum_store,
)
from openpi.latents.store.format import read_group_attrs, scan_episode_dirs
from openpi.latents.store.lock import FileLock, make_lock
from openpi.latents.store.opening import (
    KEPT_ASIDE,
    check_can_open,
    check_writable,
    episode_state,
    incomplete_episodes,
)

logger = logging.getLogger(__name__)
_STOP = object()


class LatentStoreWriteError(RuntimeError):
    """The background writer failed; the message says where. The episode being written stays incomplete."""


class LatentStoreWriter:
    """Writer of one store directory; create with :meth:`create_or_open`, use as a context manager."""

    def __init__(
        self,
        root: location.StorePath,
        group: zarr.Group,
        manifest: dict[str, Any],
        *,
        queue_size: int = 8,
        lock: FileLock | None = None,
    ):
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}.")
        self.root = root
        self.manifest = manifest
        self._group = group
        self._store: ChecksumStore | ChecksumFsspecStore = group.store  # type: ignore[assignment]
        self._store.written = {}
        self._lock = lock
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._error_where = ""
        self._closed = False
        # (task_id, episode_index) complete in the store, or finished (queued) in this run: don't run them again.
        self.completed: set[tuple[int, int]] = set()
        self._tasks: dict[int, dict[str, Any]] = {}
        self._task_groups: dict[int, zarr.Group] = {}
        self._open: set[tuple[int, int]] = set()
        for task_id, episodes in scan_episode_dirs(root).items():
            task_path = root / sf.task_group_name(task_id)
            self._tasks[task_id] = read_group_attrs(task_path)
            for k, path in episodes.items():
                if episode_state(path) is True:
                    self.completed.add((task_id, k))
        self._thread = threading.Thread(target=self._run, name="latent-store-writer", daemon=True)
        self._thread.start()

    # --- opening ------------------------------------------------------------------------------------
    @classmethod
    def create_or_open(
        cls,
        root: str | pathlib.Path | location.ObjectPath,
        manifest: Mapping[str, Any],
        *,
        resume: bool,
        queue_size: int = 8,
        resume_ignore: Collection[str] = manifest_lib.DEFAULT_RESUME_IGNORE,
        break_stale_lock: bool = False,
    ) -> LatentStoreWriter:
        """Creates a store at ``root`` (or, with ``resume``, reopens it and deletes its incomplete episodes).

        Errors before anything is written: root not writable; root non-empty but not a store; a store holding
        episodes without ``resume``; on resume, a manifest that differs (outside ``resume_ignore``) from the stored;
        another writer holding the store's lock (:class:`~openpi.latents.store.lock.StoreLockedError`), or a stale
        lock of a dead writer unless ``break_stale_lock``. The lock is held until ``close()``.
        """
        root = check_writable(root)
        requested = manifest_lib.complete_manifest(manifest)
        cls.check_can_open(
            root, requested, resume=resume, resume_ignore=resume_ignore, break_stale_lock=break_stale_lock
        )
        root.mkdir(parents=True, exist_ok=True)  # an existing directory is kept as it is (mode, owner, mount, link)
        lock = make_lock(root / sf.LOCK_FILE, what=f"latent store {root}")
        lock.acquire(break_stale=break_stale_lock)
        try:  # checked again under the lock: another writer may have changed the store meanwhile
            n_episodes = cls.check_can_open(root, requested, resume=resume, resume_ignore=resume_ignore, locked=True)
            if resume and n_episodes:
                return cls._reopen(root, requested, queue_size, lock)
            if resume:
                logger.info("--resume: %s holds no episodes yet; starting a new store.", root)
            return cls._create(root, requested, queue_size, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _create(cls, root: location.StorePath, requested: dict[str, Any], queue_size: int, lock: FileLock):
        # root is empty, or a store without episodes (e.g. from a run that died before its first one): remove only
        # the store's own episode-less task groups, never root itself.
        for task_id in scan_episode_dirs(root):
            location.remove_tree(root / sf.task_group_name(task_id))
        attrs = {"format": sf.FORMAT_NAME, "format_version": sf.FORMAT_VERSION, "manifest": requested, "resumes": []}
        sf.write_group_json(root, attrs)
        sf.write_json_atomic(root / sf.MANIFEST_FILE, requested)
        group = zarr.open_group(store=checksum_store(root), mode="r+", zarr_format=3)
        return cls(root, group, requested, queue_size=queue_size, lock=lock)

    # The checks of `create_or_open`, writing nothing (`opening.check_can_open`), for callers to run before setup.
    check_can_open = staticmethod(check_can_open)

    @classmethod
    def _reopen(
        cls, root: location.StorePath, requested: dict[str, Any], queue_size: int, lock: FileLock
    ) -> LatentStoreWriter:
        stored, _ = sf.read_store_manifest(root)  # checked against `requested` by check_can_open
        if stored.get("code_version") != requested.get("code_version"):
            logger.warning(
                "Resuming %s with code %s; it was started with %s.",
                root,
                requested.get("code_version"),
                stored.get("code_version"),
            )
        deleted, kept_aside = [], []
        for (task_id, k), why in incomplete_episodes(root).items():
            path = root / sf.task_group_name(task_id) / sf.episode_group_name(k)
            if why.startswith(KEPT_ASIDE):  # data it cannot judge: moved out of the store's view, not deleted
                n = 0
                while (aside := path.with_name(sf.kept_aside_name(path.name, n))).exists():
                    n += 1
                location.move_tree(path, aside)
                kept_aside.append(str(aside))
                logger.warning("Resume: task %d episode %d moved aside to %s, to re-run it (%s)", task_id, k, aside, why)
                continue
            location.remove_tree(path)
            deleted.append([task_id, k])
            if why != "incomplete":
                logger.warning("Resume: deleted task %d episode %d (%s)", task_id, k, why)
        if deleted:
            logger.info("Resume: deleted %d incomplete episodes (task, episode): %s", len(deleted), deleted)
        group = zarr.open_group(store=checksum_store(root), mode="r+", zarr_format=3)
        resumes = list(group.attrs.get("resumes", []))
        resumes.append(
            {
                "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "code_version": requested.get("code_version"),
                "deleted_incomplete": deleted,
                **({"kept_aside": kept_aside} if kept_aside else {}),
            }
        )
        group.attrs.update({"resumes": resumes})
        return cls(root, group, stored, queue_size=queue_size, lock=lock)

    # --- producer API -------------------------------------------------------------------------------
    def begin_episode(
        self, task: Mapping[str, Any], episode_index: int, attrs: Mapping[str, Any] | None = None
    ) -> EpisodeWriter:
        """Starts episode ``episode_index`` of ``task`` (dict with task_id, task_name, suite, language, ...)."""
        self._check()
        missing = [k for k in sf.TASK_REQUIRED_ATTRS if k not in task]
        if missing:
            raise ValueError(f"task dict lacks {missing}; it needs {list(sf.TASK_REQUIRED_ATTRS)}.")
        task_attrs = manifest_lib.to_json_compatible(dict(task), where="task")
        task_id, episode_index = int(task_attrs["task_id"]), int(episode_index)
        task_attrs["task_id"] = task_id
        known = self._tasks.get(task_id)
        if known is not None:
            diffs = [k for k in sf.TASK_REQUIRED_ATTRS if known.get(k) != task_attrs.get(k)]
            if diffs:
                raise ValueError(
                    f"task {task_id}: {diffs} differ from what the store holds "
                    f"({ {k: known.get(k) for k in diffs} }); task ids must keep their meaning across a run."
                )
        ident = (task_id, episode_index)
        if ident in self.completed:
            raise ValueError(f"task {task_id} episode {episode_index} is already complete in {self.root}; skip it.")
        if ident in self._open:
            raise ValueError(f"task {task_id} episode {episode_index} was already begun in this run.")
        ep_attrs = manifest_lib.to_json_compatible(dict(attrs or {}), where="attrs")
        clash = sorted(set(ep_attrs) & sf.RESERVED_EPISODE_ATTRS)
        if clash:
            raise ValueError(f"episode attrs {clash} are set by the store; rename them.")
        ep_attrs = {"episode_index": episode_index, **ep_attrs}
        self._tasks.setdefault(task_id, task_attrs)
        self._open.add(ident)
        sink = EpisodeSink(task_id, episode_index, ep_attrs)
        self._put(("begin", sink, task_attrs))
        return EpisodeWriter(self, sink)

    def ensure_task(self, task: Mapping[str, Any]) -> None:
        """Creates the group of ``task`` now (queued) if the store lacks it; see ``shared`` for why."""
        self._check()
        task_attrs = manifest_lib.to_json_compatible(dict(task), where="task")
        task_attrs["task_id"] = int(task_attrs["task_id"])
        self._tasks.setdefault(task_attrs["task_id"], task_attrs)
        self._put(("task", None, task_attrs))

    def flush(self) -> None:
        """Blocks until everything queued so far is on disk; raises a writer failure."""
        self._check()
        self._queue.join()
        self._check()

    def close(self) -> None:
        """Writes what is queued, stops the thread, and raises a writer failure (also on later calls)."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
            if self._lock is not None:
                self._lock.release()
        if self._error is not None:
            raise self._wrapped_error()

    def __enter__(self) -> LatentStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except LatentStoreWriteError:
            logger.exception("The latent store writer also failed while handling another exception.")

    # --- internals used by EpisodeWriter ------------------------------------------------------------
    def _episode_finished(self, sink: EpisodeSink) -> None:
        ident = (sink.task_id, sink.episode_index)
        self._open.discard(ident)
        self.completed.add(ident)

    def _put(self, item: tuple) -> None:
        if self._closed:
            raise RuntimeError(f"LatentStoreWriter for {self.root} is closed.")
        self._queue.put(item)

    def _check(self) -> None:
        if self._error is not None:
            raise self._wrapped_error()

    def _wrapped_error(self) -> LatentStoreWriteError:
        err = LatentStoreWriteError(
            f"The background writer of {self.root} failed while {self._error_where}: "
            f"{type(self._error).__name__}: {self._error}. Episodes finished before it are intact; the failed "
            "episode stays incomplete (resume deletes and re-runs it)."
        )
        err.__cause__ = self._error
        return err

    # --- writer thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None:
                    self._handle(item)
            except BaseException as e:  # re-raised in the producer
                self._error = e
                logger.error("latent store writer failed while %s: %r", self._error_where, e)
            finally:
                self._queue.task_done()

    def _handle(self, item: tuple) -> None:
        kind, sink = item[0], item[1]
        if kind == "task":
            self._error_where = f"creating task {item[2]['task_id']}"
            self._task_group(item[2])
            return
        where = f"task {sink.task_id} episode {sink.episode_index}"
        if kind == "begin":
            self._error_where = f"creating {where}"
            sink.open(self._task_group(item[2]), self._store)
        elif kind == "step":
            self._error_where = f"writing {where} rollout step {sink.committed}"
            sink.write_step(item[2])
        elif kind == "finish":
            self._error_where = f"finishing {where}"
            sink.finish(item[2])
        elif kind == "discard":
            self._error_where = f"discarding {where}"
            location.remove_tree(self.root / sf.task_group_name(sink.task_id) / sf.episode_group_name(sink.episode_index))
        else:  # pragma: no cover - internal
            raise AssertionError(kind)

    def _task_group(self, task_attrs: dict[str, Any]) -> zarr.Group:
        task_id = task_attrs["task_id"]
        group = self._task_groups.get(task_id)
        if group is None:
            name = sf.task_group_name(task_id)
            if (self.root / name / "zarr.json").exists():
                group = zarr.open_group(store=self._store, path=name, mode="r+", zarr_format=3)
            else:
                group = self._group.create_group(name, attributes=task_attrs)
            self._task_groups[task_id] = group
        return group


create_or_open = LatentStoreWriter.create_or_open
