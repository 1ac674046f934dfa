"""Many writers, one store: episodes written beside the store's owner, one claim lock per episode.

The owner (e.g. the driver of a cluster collection) opens the store with `LatentStoreWriter.create_or_open`, holds
``writer.lock`` for the whole run, writes the shared files (manifest, root attrs) and creates every task group
(`ensure_task_groups`) before any worker starts. A worker opens the store with `SharedStoreWriter.open` (no store
lock) and, for each episode it writes, holds ``.claims/task_<id>_episode_<k>.claim`` (a `FileLock` with purpose
"episode"): two workers can never write the same episode group. Each episode keeps the store's commit protocol
(arrays, then ``commit.json``), so readers see a worker's episode as on a single-writer store.

An episode whose worker died is re-run by another one with ``take_over=True`` (the owner decides: it knows the
previous worker is gone even on another host): the old claim is removed and the incomplete group deleted before the
episode is written again. A complete episode is never taken over. Claims of a finished episode are released once its
commit record is on disk; `close` releases the claims of episodes left unfinished (they stay incomplete).
"""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

import zarr

from openpi.latents.store import format as sf
from openpi.latents.store.episode_writer import ChecksumStore, EpisodeWriter
from openpi.latents.store.lock import FileLock
from openpi.latents.store.opening import episode_state
from openpi.latents.store.writer import LatentStoreWriter

CLAIMS_DIR = ".claims"


def claim_path(root: pathlib.Path, task_id: int, episode_index: int) -> pathlib.Path:
    return root / CLAIMS_DIR / f"task_{task_id}_episode_{episode_index}.claim"


def ensure_task_groups(writer: LatentStoreWriter, tasks: Iterable[Mapping[str, Any]]) -> None:
    """The owner creates the task groups (so that workers never race to create one) and the claims folder."""
    for task in tasks:
        writer.ensure_task(task)
    writer.flush()
    (writer.root / CLAIMS_DIR).mkdir(exist_ok=True)


def clear_claims(root: pathlib.Path) -> None:
    """Removes every claim (the owner, before its workers start: a claim left then belongs to a dead worker)."""
    shutil.rmtree(root / CLAIMS_DIR, ignore_errors=True)


class SharedStoreWriter(LatentStoreWriter):
    """A writer of single episodes in a store another process owns (see the module docstring)."""

    @classmethod
    def open(cls, root: str | pathlib.Path, *, queue_size: int = 8) -> SharedStoreWriter:
        root = pathlib.Path(root).absolute()
        if not sf.is_store(root):
            raise FileNotFoundError(f"{root} is not a latent store; its owner creates it before workers open it.")
        manifest, _ = sf.read_store_manifest(root)
        group = zarr.open_group(store=ChecksumStore(root), mode="r+", zarr_format=3)
        writer = cls(root, group, manifest, queue_size=queue_size, lock=None)
        writer._claims = {}
        return writer

    def begin_episode(
        self,
        task: Mapping[str, Any],
        episode_index: int,
        attrs: Mapping[str, Any] | None = None,
        *,
        take_over: bool = False,
    ) -> EpisodeWriter:
        task_id, k = int(task["task_id"]), int(episode_index)
        claim = FileLock(
            claim_path(self.root, task_id, k), purpose="episode", what=f"task {task_id} episode {k} of {self.root}"
        )
        if take_over:
            claim.path.unlink(missing_ok=True)
        claim.acquire()  # StoreLockedError while another live worker writes this episode
        try:
            path = self.root / sf.task_group_name(task_id) / sf.episode_group_name(k)
            if path.exists():
                if episode_state(path) is True:
                    raise ValueError(f"task {task_id} episode {k} is already complete in {self.root}; skip it.")
                shutil.rmtree(path)  # a dead worker's incomplete episode: ours now, written again from the start
            self.completed.discard((task_id, k))
            episode = super().begin_episode(task, k, attrs)
        except BaseException:
            claim.release()
            raise
        self._claims[(task_id, k)] = claim
        return episode

    def _handle(self, item: tuple) -> None:
        super()._handle(item)
        if item[0] == "finish":  # the commit record saying complete is on disk: the episode is no longer ours
            claim = self._claims.pop((item[1].task_id, item[1].episode_index), None)
            if claim is not None:
                claim.release()

    def close(self) -> None:
        try:
            super().close()
        finally:
            for claim in self._claims.values():
                claim.release()
            self._claims.clear()
