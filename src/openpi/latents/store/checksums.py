"""Checksums that bind what a stored file holds to where it belongs (commit format 3).

Why not the crc32c of the file: every chunk zarr writes ends with the crc32c of the bytes before it (the ``crc32c``
codec), and a CRC over a message followed by its own CRC is a constant (0x48674BC7 for CRC-32C), so format 2's
per-file crc32c was the same number for every unsharded chunk, and over a shard (inner chunks + index, each ending in
its own CRC) it depends only on the chunk lengths. A chunk file swapped with another row's passed.

The *bound checksum* of a file is the CRC-32 (the IEEE polynomial of zlib, unrelated to CRC-32C, so the trailing
CRC-32C no longer cancels; 4 GB/s) of ``PLACE_TAG + <place> + <file bytes>``, where the place is the file's path in
the store, ``task_003/episode_0/actions/c/2/0/0``: it names the task, the episode, the key and the row, so the same
bytes at another place (another row, another episode, a stale file left by a copy or sync tool) do not match.

The commit record (``commit.json``) ends with ``"body_checksum":"<8 hex digits>"}``: the CRC-32 of the place
``task_003/episode_0/commit.json`` followed by the record's bytes before that field, so a flipped bit anywhere in the
record (prompt text, step labels, dtypes) or a record copied to another episode is damage, not silently wrong data.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

from zarr.storage import FsspecStore, LocalStore

from openpi.latents.store import location
from openpi.latents.store.format import StoreCorruptionError

ALGORITHM = "crc32-bound"  # the commit record's "checksum" field for format 3
PLACE_TAG = b"openpi-latents\x00"
_SEAL_RE = re.compile(rb',"body_checksum":"([0-9a-f]{8})"\}\s*$')


def place_seed(place: str) -> int:
    """CRC-32 state after the place; continue it over the file bytes (``zlib.crc32(data, seed)``)."""
    return zlib.crc32(PLACE_TAG + place.encode())


def bound_checksum(place: str, data) -> int:
    """The bound checksum of ``data`` (bytes or a buffer) stored at ``place`` (its path in the store)."""
    return zlib.crc32(data, place_seed(place))


def bound_checksum_file(place: str, path: location.StorePath) -> int:
    crc = place_seed(place)
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def episode_place(ep_dir: location.StorePath) -> str:
    """``task_003/episode_0``: the episode's place in the store (from its folder names)."""
    return f"{ep_dir.parent.name}/{ep_dir.name}"


def seal(place: str, body_json: bytes) -> bytes:
    """``body_json`` (a JSON object, compact) with its body checksum added as the last field."""
    assert body_json.endswith(b"}")
    head = body_json[:-1] + b',"body_checksum":"'
    return head + b"%08x" % bound_checksum(place, head) + b'"}'


def unseal(place: str, raw: bytes) -> str | None:
    """None if ``raw`` (a sealed record read from ``place``) matches its body checksum, else what is wrong."""
    m = _SEAL_RE.search(raw)
    if m is None:
        return "no body_checksum at its end (truncated or edited)"
    head = raw[: m.start(1)]
    expected = int(m.group(1), 16)
    got = bound_checksum(place, head)
    if got != expected:
        return (
            f"body checksum mismatch (stored {expected:08x}, computed {got:08x} for place {place!r}): a changed "
            "byte, or a record copied from another episode"
        )
    return None


class ChunkChecksumError(StoreCorruptionError):
    """A chunk file's bound checksum differs from its commit record's: corrupt, or a file from another place."""


class _ReadCheckMixin:
    """Checks the bound checksum of every whole chunk file zarr reads through this store (format 3): unsharded
    chunks and whole shards. Partial reads of a shard (one layer) are not whole files; zarr's CRC-32C of the shard
    index and of each inner chunk still catches flipped bits there, and ``verify`` checks the whole file."""

    place: str = ""  # the array's place, "task_003/episode_0/actions"
    expected: Sequence[int | None] = ()  # bound checksum of each committed row's file

    async def get(self, key: str, prototype=None, byte_range=None):
        buf = await super().get(key, prototype, byte_range)  # type: ignore[misc]
        if buf is not None and byte_range is None and key.startswith("c/"):
            row = int(key.split("/")[1])
            want = self.expected[row] if row < len(self.expected) else None
            if want is not None and bound_checksum(f"{self.place}/{key}", buf.as_numpy_array()) != want:
                raise ChunkChecksumError(
                    f"chunk file {self.place}/{key} (row {row}) does not match the checksum in its commit record: "
                    "it is corrupt or a copy of another row's or episode's file"
                )
        return buf


class CheckedLocalStore(_ReadCheckMixin, LocalStore):
    """zarr's LocalStore that checks bound checksums on read (``_ReadCheckMixin``)."""


class CheckedFsspecStore(_ReadCheckMixin, FsspecStore):
    """zarr's FsspecStore that checks bound checksums on read (``_ReadCheckMixin``)."""


def checked_store(path: location.StorePath, place: str, expected: Sequence[int | None]):
    """A read-only zarr store of the array at ``path`` whose whole-file reads are checked against ``expected``."""
    cls = CheckedFsspecStore if location.is_remote(path) else CheckedLocalStore
    store = location.zarr_store(path, read_only=True, store_class=cls)
    store.place, store.expected = place, expected
    return store
