"""The commit record of an episode: what readers trust, written as ONE atomic write per step.

Protocol (format 3, and 2 before it): for each rollout step the writer first writes every array row (one chunk/shard file per key and
row, see ``format.row_chunk_key``), then replaces ``<episode>/commit.json`` in one write: on a local disk a temp
file + ``os.replace`` (zarr's LocalStore ``set``), on an object store a single PUT of the same bytes. Readers read
only the commit record: a step counts once a record naming it exists, and a crash at any point leaves either the
previous record or the new one, never a mix. ``commit.json``::

    {"format": "openpi-latents-commit", "format_version": 3, "checksum": "crc32-bound",
     "committed_steps": N, "complete": false, "step_t": [t_0, ..., t_{N-1}],
     "fields": {key: {"shape", "dtype", "dims", "optional"}},
     "sparse_steps": {optional key: [rollout step of each stored row]},
     "string_tables": {string key: [distinct values]},
     "attrs": {episode attrs written with steps and by finish(): prompt, success, total_steps, ...},
     "checksums": {key: [bound checksum of the chunk file of row 0, row 1, ...]},   # null: zero-size field, no file
     "body_checksum": "<crc32 of the place and the bytes before it, 8 hex digits>"}

The checksums bind each file's content to its place (task, episode, key, row) and the body checksum covers the record
itself (see ``checksums``). Format 2 (stores written before) had the same fields with ``"checksum": "crc32c"``: the
CRC-32C of each whole file, which for unsharded arrays is a constant (the chunk ends with its own CRC-32C), and no
body checksum; it is read as before, and ``verify`` says its checks cannot catch a chunk moved to another place.

Format 1 (stores written before this module) kept the same state (without checksums) in the episode group's attrs,
updated one key at a time, so it could be seen half-written; :func:`read_commit` reads both and reports an
inconsistent record as :class:`DamagedEpisodeError`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from openpi.latents.store import checksums as checksums_lib
from openpi.latents.store import format as sf
from openpi.latents.store.format import DamagedEpisodeError, StoreFormatError, read_group_attrs

COMMIT_FORMAT = "openpi-latents-commit"
CHECKSUM = checksums_lib.ALGORITHM  # format 3: the bound checksum of each file (``checksums``)
LEGACY_CHECKSUM = "crc32c"  # format 2: CRC-32C (Castagnoli) of the whole file, a constant for unsharded chunks
COMMIT_FORMAT_VERSION = 3


@dataclasses.dataclass(frozen=True)
class CommitRecord:
    """The committed state of one episode (either format)."""

    committed_steps: int
    complete: bool
    step_t: list[int]
    fields: dict[str, sf.FieldSpec]
    sparse: dict[str, list[int]]
    strings: dict[str, list[str]]
    attrs: dict[str, Any]  # episode attrs that come with commits (format 1: all non-bookkeeping group attrs)
    checksums: dict[str, list[int | None]] | None  # None: format 1 (no checksums)
    format_version: int = COMMIT_FORMAT_VERSION  # 3: bound checksums + body checksum; 2: whole-file crc32c; 1: none

    @property
    def checksums_bind_place(self) -> bool:
        """Whether ``checksums`` are bound checksums (format 3), which a chunk moved from another place fails."""
        return self.format_version >= 3

    def stored_rows(self, key: str) -> list[int]:
        """Rollout step of each stored row of ``key`` (row i <-> step list[i])."""
        if self.fields[key].optional:
            return [s for s in self.sparse.get(key, []) if s < self.committed_steps]
        return list(range(self.committed_steps))

    def to_json_bytes(self, episode_place: str) -> bytes:
        """The sealed record (with its body checksum) of the episode at ``episode_place`` (``task_003/episode_0``)."""
        assert self.checksums is not None, "only format-3 records are written"
        body = {
            "format": COMMIT_FORMAT,
            "format_version": COMMIT_FORMAT_VERSION,
            "checksum": CHECKSUM,
            sf.EPISODE_COMMITTED: self.committed_steps,
            sf.EPISODE_COMPLETE: self.complete,
            sf.EPISODE_STEP_T: self.step_t,
            sf.EPISODE_FIELDS: {k: spec.to_json() for k, spec in self.fields.items()},
            sf.EPISODE_SPARSE: self.sparse,
            sf.EPISODE_STRINGS: self.strings,
            "attrs": self.attrs,
            "checksums": self.checksums,
        }
        raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        return checksums_lib.seal(commit_place(episode_place), raw)


def commit_place(episode_place: str) -> str:
    return f"{episode_place}/{sf.COMMIT_FILE}"


def _parse(
    path: pathlib.Path, data: dict[str, Any], attrs: dict[str, Any], checksums, version: int
) -> CommitRecord:
    committed = int(data[sf.EPISODE_COMMITTED])
    step_t = [int(t) for t in data.get(sf.EPISODE_STEP_T, [])]
    if committed < 0 or len(step_t) < committed or (checksums is not None and len(step_t) != committed):
        raise ValueError(f"{sf.EPISODE_STEP_T} has {len(step_t)} entries for {committed} committed steps")
    fields = {k: sf.FieldSpec.from_json(k, v) for k, v in data.get(sf.EPISODE_FIELDS, {}).items()}
    sparse = {k: [int(s) for s in v] for k, v in data.get(sf.EPISODE_SPARSE, {}).items()}
    record = CommitRecord(
        committed_steps=committed,
        complete=bool(data[sf.EPISODE_COMPLETE]),
        step_t=step_t[:committed],
        fields=fields,
        sparse=sparse,
        strings={k: [str(s) for s in v] for k, v in data.get(sf.EPISODE_STRINGS, {}).items()},
        attrs=attrs,
        checksums=checksums,
        format_version=version,
    )
    for key, spec in fields.items():
        if spec.optional and key not in sparse:
            raise ValueError(f"optional key {key!r} has no {sf.EPISODE_SPARSE} entry")
        if checksums is not None:
            n_rows = len(sparse[key]) if spec.optional else committed
            if len(checksums.get(key, [])) != n_rows:
                raise ValueError(f"key {key!r} has {len(checksums.get(key, []))} checksums for {n_rows} rows")
    return record


def read_commit(ep_dir: pathlib.Path) -> tuple[CommitRecord, dict[str, Any]]:
    """(commit record, episode group attrs) of the episode folder ``ep_dir``, in either format.

    Raises :class:`DamagedEpisodeError` (naming the file) when the record or the group metadata is missing, corrupt
    or inconsistent; its ``may_be_complete`` says whether the damaged episode may have finished.
    """
    commit_path = ep_dir / sf.COMMIT_FILE
    try:
        raw = commit_path.read_bytes()
    except FileNotFoundError:
        raw = None
    except OSError as e:
        raise DamagedEpisodeError(f"{commit_path}: unreadable ({e}).", may_be_complete=True) from e
    try:
        group_attrs = read_group_attrs(ep_dir)
    except StoreFormatError as e:
        if raw is None:
            _refuse_data_without_record(ep_dir)
        complete = raw is not None and _says_complete(raw)
        raise DamagedEpisodeError(
            f"{e} (episode folder {ep_dir}; {'its commit record says complete' if complete else 'not complete'})",
            may_be_complete=complete,
        ) from e
    if raw is None and sf.EPISODE_COMMIT_MARKER in group_attrs:  # format 2+, begun, no step committed yet
        _refuse_data_without_record(ep_dir)  # the record is written before any array: data without it is damage
        return CommitRecord(0, False, [], {}, {}, {}, {}, {}), group_attrs
    try:
        if raw is not None:
            data = json.loads(raw)
            version = data.get("format_version")
            if data.get("format") != COMMIT_FORMAT or version not in (2, 3):
                raise ValueError(f"format {data.get('format')!r} version {version!r}")
            if version >= 3:
                problem = checksums_lib.unseal(commit_place(checksums_lib.episode_place(ep_dir)), raw)
                if problem is not None:
                    raise ValueError(problem)
            checksums = {k: [None if c is None else int(c) for c in v] for k, v in data["checksums"].items()}
            return _parse(commit_path, data, dict(data.get("attrs") or {}), checksums, version), group_attrs
        if sf.EPISODE_COMMITTED not in group_attrs or sf.EPISODE_COMPLETE not in group_attrs:
            raise ValueError(f"no {sf.COMMIT_FILE} and no {sf.EPISODE_COMMITTED}/{sf.EPISODE_COMPLETE} attrs")
        legacy_attrs = {k: v for k, v in group_attrs.items() if k not in sf.RESERVED_EPISODE_ATTRS}
        return _parse(ep_dir / "zarr.json", group_attrs, legacy_attrs, None, 1), group_attrs
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        where = commit_path if raw is not None else ep_dir / "zarr.json"
        complete = bool(group_attrs.get(sf.EPISODE_COMPLETE)) if raw is None else _says_complete(raw)
        raise DamagedEpisodeError(
            f"{where}: damaged commit record ({type(e).__name__}: {e}); "
            + ("it may hold a finished episode." if complete else "the episode had not finished."),
            may_be_complete=complete,
        ) from e


def _refuse_data_without_record(ep_dir: pathlib.Path) -> None:
    """DamagedEpisodeError if the episode folder holds chunk files but no commit record (an interrupted copy, a
    deleted commit.json): nothing says which rows are whole, so it may be a finished episode; resume keeps it aside."""
    data = [d.name for d in ep_dir.iterdir() if d.is_dir() and (d / "c").exists()]
    if data:
        raise DamagedEpisodeError(
            f"{ep_dir / sf.COMMIT_FILE}: missing, but the episode folder holds data of {len(data)} keys "
            f"({', '.join(sorted(data)[:4])}{', ...' if len(data) > 4 else ''}); it may be a finished episode "
            "whose commit record was lost (an interrupted copy?). Restore commit.json from the source, or --resume "
            f"moves the folder aside (to {sf.kept_aside_name(ep_dir.name, 0)} or the next free number) and re-runs it.",
            may_be_complete=True,
            kept_aside_by_resume=True,
        )


def _says_complete(raw: bytes) -> bool:
    """Whether a (possibly damaged) commit record may say complete: True when it cannot be parsed at all."""
    try:
        return bool(json.loads(raw).get(sf.EPISODE_COMPLETE, True))
    except (ValueError, AttributeError):
        return True
