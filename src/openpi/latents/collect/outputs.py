"""Where a run's records go: the zarr latent store, or openpi-era pickle files (one per task)."""

from __future__ import annotations

import dataclasses
import errno
import pathlib
from typing import Any, Protocol

from openpi.envs import base as env_base
from openpi.latents import store as _store
from openpi.latents.collect.args import RESUME_IGNORE, CollectionArgs, Plan
from openpi.latents.recording.disk import NoSpaceError, check_not_full
from openpi.latents.store import location, pickle_format
from openpi.latents.store import manifest as manifest_lib


@dataclasses.dataclass(frozen=True)
class EpisodeOutcome:
    task_id: int
    episode_index: int
    success: bool
    total_steps: int
    error: str | None
    skipped: bool = False  # already complete in the output (resume)


def _kept_outcome(task_id: int, k: int, metadata: dict[str, Any]) -> EpisodeOutcome:
    """The outcome of an episode a resumed run keeps, from its stored metadata."""
    return EpisodeOutcome(
        task_id, k, bool(metadata["success"]), int(metadata["total_steps"]), metadata.get("error"), True
    )


def task_dict(task: env_base.TaskInfo) -> dict[str, Any]:
    """A task as the store records it."""
    return {"task_id": task.task_id, "task_name": task.name, "suite": task.suite, "language": task.language}


class EpisodeSink(Protocol):
    """One episode's writer: one record per inference, then the episode's outcome."""

    def append_step(self, record: dict[str, Any]) -> None: ...
    def finish(self, metadata: dict[str, Any]) -> None: ...


class Output(Protocol):
    def completed(self, task: dict[str, Any]) -> set[int]: ...
    def previous_outcome(self, task_id: int, k: int) -> EpisodeOutcome: ...
    def begin(self, task: dict[str, Any], k: int, attrs: dict[str, Any]) -> EpisodeSink: ...
    def close(self) -> None: ...


class ZarrOutput:
    def __init__(self, args: CollectionArgs, manifest: dict[str, Any]):
        self.writer = _store.LatentStoreWriter.create_or_open(
            args.output_dir,
            manifest,
            resume=args.resume,
            queue_size=args.queue_size,
            resume_ignore=RESUME_IGNORE,
            break_stale_lock=args.break_stale_lock,
        )
        self._reader: _store.LatentStore | None = None  # the episodes complete before this run

    def completed(self, task: dict[str, Any]) -> set[int]:
        return {k for t, k in self.writer.completed if t == task["task_id"]}

    def previous_outcome(self, task_id: int, k: int) -> EpisodeOutcome:
        if self._reader is None:
            self._reader = _store.open_store(self.writer.root)
        return _kept_outcome(task_id, k, self._reader.episode(task_id, k).metadata)

    def begin(self, task: dict[str, Any], k: int, attrs: dict[str, Any]) -> EpisodeSink:
        return self.writer.begin_episode(task, k, attrs)

    def close(self) -> None:
        self.writer.close()


class PickleOutput:
    def __init__(self, args: CollectionArgs, manifest: dict[str, Any]):
        self.args = args
        self.manifest = manifest  # stored in each pickle (the analysis reads layer ids and cameras from it)
        self.writers: dict[int, pickle_format.PickleTaskWriter] = {}

    def _writer(self, task: dict[str, Any]) -> pickle_format.PickleTaskWriter:
        tid = task["task_id"]
        if tid not in self.writers:
            self.writers[tid] = pickle_format.PickleTaskWriter(
                self.args.output_dir, task, resume=self.args.resume, manifest=self.manifest
            )
        return self.writers[tid]

    def completed(self, task: dict[str, Any]) -> set[int]:
        return self._writer(task).completed

    def previous_outcome(self, task_id: int, k: int) -> EpisodeOutcome:
        return _kept_outcome(task_id, k, self.writers[task_id].data["episodes"][f"episode_{k}"]["metadata"])

    def begin(self, task: dict[str, Any], k: int, attrs: dict[str, Any]) -> EpisodeSink:
        return self._writer(task).begin_episode(k, attrs)

    def close(self) -> None:
        pass


def open_output(args: CollectionArgs, manifest: dict[str, Any]) -> Output:
    """The output of `args.output_format`; a full disk while creating it raises `NoSpaceError` naming the path."""
    try:
        return ZarrOutput(args, manifest) if args.output_format == "zarr" else PickleOutput(args, manifest)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise NoSpaceError(
            f"No space left for --output-dir {args.output_dir} ({e.filename or args.output_dir}: {e.strerror}). "
            "Free some space there or choose another --output-dir."
        ) from e


def _pickle_path(args: CollectionArgs, task: env_base.TaskInfo) -> pathlib.Path:
    folder = pathlib.Path(args.output_dir) / pickle_format.PICKLE_DIR
    return folder / pickle_format.pickle_file_name(task.task_id, task.name)


def check_output(plan: Plan, manifest: dict[str, Any]) -> None:
    """The checks of opening the output, without writing anything (so that they fail before the policy loads).

    Raises PermissionError / NotADirectoryError for a directory that cannot be written, NoSpaceError for a full
    filesystem, ObjectStoreError for an ``s3://`` / ``gs://`` output that cannot be used (package, credentials,
    bucket), ValueError for what needs a local directory (pickles, videos), FileExistsError for existing
    output without ``--resume`` (or a non-empty directory that is not a latent store), ValueError for a resume whose
    settings differ from the stored run's. Opening the store checks the same again.
    """
    args = plan.args
    if location.is_remote(location.as_path(args.output_dir)):
        _check_object_store_output(args)
        root = _store.check_writable(args.output_dir)
    else:
        root = _store.check_writable(args.output_dir)
        check_not_full(root)
    if args.output_format == "pickle":
        existing = [t.task_id for t in plan.tasks if _pickle_path(args, t).exists()]
        if existing and not args.resume:
            raise FileExistsError(
                f"{root / pickle_format.PICKLE_DIR} already holds tasks {existing}; pass --resume to continue or "
                "choose a new --output-dir."
            )
        return
    _store.LatentStoreWriter.check_can_open(
        root,
        manifest_lib.complete_manifest(manifest),
        resume=args.resume,
        resume_ignore=RESUME_IGNORE,
        break_stale_lock=args.break_stale_lock,
    )


def _check_object_store_output(args: CollectionArgs) -> None:
    local_only = [
        flag
        for flag, on in (
            ("--output-format pickle", args.output_format == "pickle"),
            ("--save-videos", args.save_videos),
        )
        if on
    ]
    if local_only:
        raise ValueError(
            f"{' and '.join(local_only)} write local files and need a local --output-dir, not {args.output_dir}; "
            "drop the flag or write to a directory (copy it to the bucket afterwards)."
        )
    if args.backend == "ray":
        # The Ray workers' per-episode claims are lock files (store/shared.py): they need a filesystem.
        raise ValueError(
            f"--backend ray writes through per-episode claim files on a filesystem the nodes share, not an object "
            f"store ({args.output_dir}): give a shared directory (e.g. NFS) as --output-dir and copy the store to "
            "the bucket afterwards, or collect into the bucket with --num-envs on one machine."
        )
