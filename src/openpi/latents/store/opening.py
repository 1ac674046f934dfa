"""Opening a latent store for writing: the checks that write nothing, and what resuming must delete.

``check_writable`` and ``check_can_open`` let a caller fail before expensive setup (the collection CLI, the policy
server); :class:`~openpi.latents.store.writer.LatentStoreWriter` runs them again under the store's lock.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Collection, Mapping
from typing import Any

from openpi.latents.store import format as sf
from openpi.latents.store import location
from openpi.latents.store import manifest as manifest_lib
from openpi.latents.store.commit import read_commit
from openpi.latents.store.format import DamagedEpisodeError, is_store, scan_episode_dirs
from openpi.latents.store.lock import make_lock


def check_writable(root: str | pathlib.Path | location.ObjectPath) -> location.StorePath:
    """Raises PermissionError/NotADirectoryError (naming the path and the fix) unless ``root`` can be written.

    Checks the nearest existing ancestor when ``root`` does not exist yet, by creating and deleting a file. On object
    storage (``s3://``, ``gs://``) writes and deletes a probe object: ``location.ObjectStoreError`` says what is
    missing (the s3fs/gcsfs package and its extra, credentials, the bucket) before anything else runs.
    """
    root = location.as_path(root)
    if isinstance(root, location.ObjectPath):
        return location.check_object_store_writable(root)
    root = root.expanduser().absolute()
    probe_dir = root
    while not probe_dir.exists():
        if probe_dir.is_symlink():  # dangling: creating the directory would fail with "File exists"
            raise NotADirectoryError(
                f"Output path {root}: {probe_dir} is a symbolic link to {os.readlink(probe_dir)}, which does not "
                "exist; create the link's target directory, remove the link, or choose another --output-dir."
            )
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise NotADirectoryError(f"Output path {root}: {probe_dir} is not a directory; choose another --output-dir.")
    try:
        fd, name = tempfile.mkstemp(prefix=".write_probe_", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise PermissionError(
            f"Output dir {root} is not writable ({probe_dir}: {e.strerror or e}); fix its permissions or choose "
            "another --output-dir."
        ) from e
    return root


def _user_entries(root: location.StorePath) -> list[location.StorePath]:
    """Entries of ``root`` other than the writer lock and its temp/guard files."""
    lock = sf.LOCK_FILE
    return [p for p in root.iterdir() if p.name != lock and not p.name.startswith(f".{lock}.")]


def episode_state(path: location.StorePath) -> bool | DamagedEpisodeError:
    """True: complete; False: incomplete; or the damage found."""
    try:
        return read_commit(path)[0].complete
    except DamagedEpisodeError as e:
        return e


def check_can_open(
    root: str | pathlib.Path | location.ObjectPath,
    manifest: Mapping[str, Any],
    *,
    resume: bool,
    resume_ignore: Collection[str] = manifest_lib.DEFAULT_RESUME_IGNORE,
    break_stale_lock: bool = False,
    locked: bool = False,
) -> int:
    """The checks of `create_or_open`, writing nothing (so a caller can fail before expensive setup).

    Returns the number of episodes already in the store. Raises PermissionError / NotADirectoryError (not
    writable), FileExistsError (non-empty non-store directory; a store with episodes without ``resume``;
    StoreLockedError: another writer, or a stale lock without ``break_stale_lock``) and ValueError (on resume, a
    manifest differing outside ``resume_ignore``). ``locked``: the caller holds the lock (skip that check).
    """
    root = check_writable(root)
    lock = None if locked or not root.exists() else make_lock(root / sf.LOCK_FILE, what=f"latent store {root}")
    if lock is not None:
        lock.check(break_stale=True)  # a live writer first: the other checks may be about its half-made store
    n_episodes = _check_content(root, manifest, resume=resume, resume_ignore=resume_ignore)
    if lock is not None:
        lock.check(break_stale=break_stale_lock)  # then a stale lock (after the other problems, to fix at once)
    return n_episodes


def _check_content(
    root: location.StorePath, manifest: Mapping[str, Any], *, resume: bool, resume_ignore: Collection[str]
) -> int:
    if not (root.exists() and _user_entries(root)):
        return 0
    if not is_store(root):
        raise FileExistsError(
            f"{root} is not empty and is not a latent store (no zarr.json with format {sf.FORMAT_NAME!r}); "
            "choose a new --output-dir."
        )
    n_episodes = sum(len(eps) for eps in scan_episode_dirs(root).values())
    if n_episodes and not resume:
        plural = "s" if n_episodes != 1 else ""
        raise FileExistsError(
            f"{root} already holds {n_episodes} episode{plural}; pass --resume to continue or choose a new "
            "--output-dir."
        )
    if n_episodes:
        stored, _ = sf.read_store_manifest(root)  # validates root attrs and manifest.json
        incomplete_episodes(root)  # raises for a damaged episode that may have finished (resume would refuse)
        diffs = manifest_lib.manifest_differences(stored, manifest, ignore=resume_ignore)
        if diffs:
            raise ValueError(
                f"Cannot resume {root}: it was written with a different manifest. Differing fields:\n  "
                + "\n  ".join(diffs)
                + "\nResume with the original settings, or choose a new --output-dir."
            )
    return n_episodes


KEPT_ASIDE = "kept aside"  # the start of incomplete_episodes' why for data it cannot judge: move it, do not delete


def incomplete_episodes(root: location.StorePath) -> dict[tuple[int, int], str]:
    """(task, episode) -> why, for every episode resume must delete (or, why starting with KEPT_ASIDE, move aside);
    raises if a damaged one may be complete."""
    out: dict[tuple[int, int], str] = {}
    suspect = []
    for task_id, episodes in scan_episode_dirs(root).items():
        for k, path in sorted(episodes.items()):
            state = episode_state(path)
            if isinstance(state, DamagedEpisodeError) and state.kept_aside_by_resume:
                out[(task_id, k)] = f"{KEPT_ASIDE}: {state}"
            elif isinstance(state, DamagedEpisodeError):
                if state.may_be_complete:
                    suspect.append(str(state))
                out[(task_id, k)] = f"damaged: {state}"
            elif not state:
                out[(task_id, k)] = "incomplete"
    if suspect:
        raise DamagedEpisodeError(
            "Cannot resume: these episodes are damaged and may hold finished episodes; inspect them (python -m "
            "openpi.latents.store verify <store>) and delete their folders to re-run them:\n  " + "\n  ".join(suspect),
            may_be_complete=True,
        )
    return out
