"""Full integrity check of a latent store: every committed row of every episode.

``python -m openpi.latents.store verify <store>`` (see ``__main__``) or :func:`verify_store`. Per episode:

* the task group and the episode's commit record are readable and consistent (``commit.read_commit``);
* the commit record's body checksum matches (format 3: a flipped bit or a record copied from another episode);
* every key's array metadata opens and agrees with the commit record (dtype, byte order, per-step shape);
* format 3: the chunk file of every committed row exists and its bound checksum (content and place, see
  ``checksums``) equals the commit record's (catches deleted, truncated, bit-flipped files and files swapped with
  another row's or episode's, without decoding); ``decode=True`` also decodes every row;
* format 2 (stores written before format 3): the same with the whole-file crc32c, which catches deleted, truncated
  and bit-flipped files but not a chunk moved from another place, and no body checksum: such episodes are counted in
  ``VerifyReport.legacy_unbound`` and said so, never called damaged for that alone;
* format 1 (no checksums): every committed row is decoded (catches truncated / corrupt chunks), and an absent chunk
  file is reported where the format allows (``format.legacy_row_checkable``: zarr wrote no file for all-zero rows).

An episode folder holding array data but no commit record (an interrupted copy) is damage: ``--resume`` moves it
aside rather than deleting data it cannot judge. Incomplete episodes are checked like complete ones (their committed rows must be intact too) and listed separately;
``--resume`` deletes and re-runs them, and any damaged episode known not to have finished.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import google_crc32c

from openpi.latents.store import checksums as checksums_lib
from openpi.latents.store import format as sf
from openpi.latents.store import location
from openpi.latents.store.format import DamagedEpisodeError, StoreFormatError, scan_episode_dirs
from openpi.latents.store.reader import EpisodeReader, LatentStore


@dataclasses.dataclass(frozen=True)
class Damage:
    """One damaged thing: where (task, episode or None, file), what, and whether ``--resume`` repairs it."""

    task_id: int
    episode_index: int | None
    path: location.StorePath
    problem: str
    repaired_by_resume: bool
    kept_aside_by_resume: bool = False

    def describe(self) -> str:
        where = f"task {self.task_id}" + ("" if self.episode_index is None else f" episode {self.episode_index}")
        if self.kept_aside_by_resume:
            fix = "--resume moves the folder aside (not deleted) and re-runs it"
        elif self.repaired_by_resume:
            fix = "--resume deletes and re-runs it"
        else:
            fix = "delete the episode folder, --resume"
        return f"{where}: {self.path}: {self.problem} [{fix}]"


@dataclasses.dataclass
class VerifyReport:
    root: location.StorePath
    episodes: int = 0
    complete: int = 0
    rows: int = 0
    damages: list[Damage] = dataclasses.field(default_factory=list)
    incomplete: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    legacy_unbound: int = 0  # episodes of format 1/2: checksums (if any) that cannot catch a chunk moved elsewhere

    @property
    def ok(self) -> bool:
        return not self.damages

    def damaged_episodes(self) -> set[tuple[int, int | None]]:
        return {(d.task_id, d.episode_index) for d in self.damages}


def _crc32c_file(path: location.StorePath) -> int:
    crc = 0
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            crc = google_crc32c.extend(crc, block)
    return crc


def _check_rows(ep: EpisodeReader, key: str, decode: bool, report: VerifyReport, add) -> None:
    spec = ep.fields[key]
    checksums = None if ep.record.checksums is None else ep.record.checksums[key]
    bound = ep.record.checksums_bind_place
    place = checksums_lib.episode_place(ep.path)
    steps = ep.present_steps(key)
    missing = {row for row, _ in ep.missing_chunks(key)}  # one listing per key on object storage
    for row, step in enumerate(steps):
        report.rows += 1
        chunk = sf.row_chunk_key(spec, row)
        where = f"key {key!r} row {row} (rollout step {step})"
        if chunk is not None and checksums is not None:
            path = ep.path / chunk
            if row in missing:
                add(path, f"missing chunk file of {where}")
                continue
            if checksums[row] is not None:
                got = checksums_lib.bound_checksum_file(f"{place}/{chunk}", path) if bound else _crc32c_file(path)
                if got != checksums[row]:
                    what = "truncated, corrupt or another row's/episode's file" if bound else "truncated or corrupt"
                    add(path, f"checksum mismatch of {where} ({what})")
                    continue
        elif chunk is not None and row in missing:  # format 1: only where legacy_row_checkable
            add(ep.path / chunk, f"missing chunk file of {where}")
            continue
        if decode or checksums is None:
            try:
                ep.read(key, steps=step)
            except StoreFormatError as e:
                add(ep.path / key, f"cannot read {where}: {e}")


def _verify_episode(path: location.StorePath, t: int, k: int, decode: bool, report: VerifyReport) -> None:
    report.episodes += 1
    try:
        ep = EpisodeReader(path, t, k)
    except DamagedEpisodeError as e:
        report.damages.append(Damage(t, k, path, str(e), not e.may_be_complete, e.kept_aside_by_resume))
        return
    report.legacy_unbound += not ep.record.checksums_bind_place
    repaired = not ep.complete

    def add(file: pathlib.Path, problem: str) -> None:
        report.damages.append(Damage(t, k, file, problem, repaired))

    report.complete += ep.complete
    if not ep.complete:
        report.incomplete.append((t, k))
    for key in ep.keys():
        try:
            ep.open_array(key)  # also compares the array metadata with the commit record (array_checks)
        except StoreFormatError as e:
            add(path / key, str(e))
            continue
        _check_rows(ep, key, decode, report, add)


def verify_store(
    root: str | pathlib.Path | location.ObjectPath,
    *,
    decode: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Checks every committed row of the store at ``root`` (see the module docstring). Raises StoreFormatError /
    FileNotFoundError if ``root`` is not a latent store at all; everything else is collected in the report."""
    root = location.as_path(root)
    LatentStore(root)  # root attrs and manifest
    report = VerifyReport(root)
    dirs = scan_episode_dirs(root)
    total = sum(len(eps) for eps in dirs.values())
    done = 0
    for t, episodes in sorted(dirs.items()):
        task_path = root / sf.task_group_name(t)
        try:
            sf.require_attrs(task_path, sf.read_group_attrs(task_path), sf.TASK_REQUIRED_ATTRS, "task")
        except StoreFormatError as e:
            report.damages.append(Damage(t, None, task_path, str(e), False))
        for k, path in sorted(episodes.items()):
            _verify_episode(path, t, k, decode, report)
            done += 1
            if progress is not None:
                progress(done, total)
    return report
