"""On-disk conventions of the latent store, shared by the writer and the reader.

Layout (zarr v3; a local directory or a prefix on object storage, see ``location``)::

    <root>/zarr.json                     root group; attrs: format, format_version, manifest, resumes
    <root>/manifest.json                 the run manifest (same content as the root attr "manifest")
    <root>/writer.lock                   present while a writer runs (see ``lock``)
    <root>/task_{id:03d}/                group; attrs: task_id, task_name, suite, language (+ caller extras)
    <root>/task_{id:03d}/episode_{k}/    group; attrs: episode_index + caller attrs + ``commit_record``
    <root>/task_{id:03d}/episode_{k}/commit.json   the commit record: the only thing readers trust (see ``commit``)
    <root>/task_{id:03d}/episode_{k}/<key>   one array per record key, leading axis = rollout step

Format version 1 (stores written before the commit record existed) kept the commit state in the episode group's
attrs (see EPISODE_* below) and had no checksums; it is still read (``commit.read_commit``).

Every array stores its axis names as zarr ``dimension_names`` and as the attr ``dims`` (``["step", ...]``).
Arrays with a layer axis are sharded one shard per rollout step, with inner chunks of one layer (and of one
denoising step where that keeps chunks >= 512 KiB), so one layer can be read across steps without reading whole steps.
Others are one chunk per rollout step. All chunks are compressed with blosc(zstd level 1, byte shuffle), then carry
a crc32c (zarr's ``crc32c`` codec; format 2), which zarr checks whenever it decodes the chunk.

String values (``prompt``, ``cf_prompt``, ...) are stored as int32 arrays of indices into the episode attr
``string_tables[key]`` (readable without zarr's non-standard string types, e.g. by tensorstore).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

from openpi.latents import schema
from openpi.latents.store import bf16, location
from openpi.latents.store.location import StorePath

FORMAT_NAME = "openpi-latents-store"
FORMAT_VERSION = 2  # 2: per-episode commit.json with per-row checksums; 1: commit state in the episode attrs
MANIFEST_FILE = "manifest.json"
LOCK_FILE = "writer.lock"
COMMIT_FILE = "commit.json"
EPISODE_COMMIT_MARKER = "commit_record"  # format-2 episode group attr naming its commit file

# Episode attrs owned by the store (callers cannot set them through begin_episode/finish).
EPISODE_COMMITTED = "committed_steps"  # number of rollout steps fully written: readers trust this, not array shapes
EPISODE_COMPLETE = "complete"  # True only after finish() and after all steps were written
EPISODE_STEP_T = "step_t"  # env timestep t of each committed rollout step
EPISODE_FIELDS = "fields"  # key -> FieldSpec JSON (fixed by the first occurrence of the key)
EPISODE_SPARSE = "sparse_steps"  # optional key -> rollout-step indices where it is present (row i <-> step list[i])
EPISODE_STRINGS = "string_tables"  # string key -> list of distinct values (the array holds indices)
RESERVED_EPISODE_ATTRS = frozenset(
    {
        EPISODE_COMMITTED,
        EPISODE_COMPLETE,
        EPISODE_STEP_T,
        EPISODE_FIELDS,
        EPISODE_SPARSE,
        EPISODE_STRINGS,
        EPISODE_COMMIT_MARKER,
    }
)
TASK_REQUIRED_ATTRS = ("task_id", "task_name", "suite", "language")

BLOSC_CLEVEL = 1  # zstd level: hidden states barely compress (1.28x at 1, 1.34x at 3) and 3 is ~2x slower
MIN_INNER_CHUNK_BYTES = 512 * 1024  # axes before the layer axis are split only while inner chunks stay this big

_TASK_RE = re.compile(r"^task_(\d+)$")
_EPISODE_RE = re.compile(r"^episode_(\d+)$")
_SUPPORTED_KINDS = "biuf"


def task_group_name(task_id: int) -> str:
    return f"task_{int(task_id):03d}"


def episode_group_name(episode_index: int) -> str:
    return f"episode_{int(episode_index)}"


def parse_task_group_name(name: str) -> int | None:
    m = _TASK_RE.match(name)
    return int(m.group(1)) if m else None


def parse_episode_group_name(name: str) -> int | None:
    m = _EPISODE_RE.match(name)
    return int(m.group(1)) if m else None


class StoreFormatError(ValueError):
    """The directory is not a (complete, uncorrupted) latent store; the message names the offending path."""


class StoreCorruptionError(StoreFormatError):
    """Stored data is missing or corrupt; the message names the file or array, the task and the episode."""


class MissingChunkError(StoreCorruptionError):
    """A chunk file of a committed row is missing (zarr would have returned the fill value, 0, instead)."""


class DamagedEpisodeError(StoreFormatError):
    """An episode's metadata or commit record is unreadable or inconsistent.

    ``may_be_complete`` is False when the episode is known not to have finished (``--resume`` deletes and re-runs
    it); True when it may hold a finished episode (resume refuses and names the folder to inspect or delete).
    ``kept_aside_by_resume``: array data without any commit record (an interrupted copy), which cannot be judged;
    ``--resume`` moves the folder aside (``kept_aside_name``) and re-runs the episode instead of refusing.
    """

    def __init__(self, message: str, *, may_be_complete: bool, kept_aside_by_resume: bool = False):
        super().__init__(message)
        self.may_be_complete = may_be_complete
        self.kept_aside_by_resume = kept_aside_by_resume


def kept_aside_name(episode_dir_name: str, n: int) -> str:
    """Name of an episode folder that ``--resume`` moved aside (not matched by the episode scan)."""
    return f"{episode_dir_name}.kept-aside-{n}"


def write_group_json(path: StorePath, attrs: dict[str, Any]) -> None:
    """Writes (atomically: temp file + rename, or one PUT) a zarr v3 group's zarr.json in the existing directory
    ``path``, without touching anything else there (zarr's ``create_group(overwrite=True)`` would rmtree it)."""
    meta = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
    write_json_atomic(path / "zarr.json", meta)


def write_json_atomic(path: StorePath, value: Any) -> None:
    """Replaces ``path`` atomically: temp file + rename locally, one PUT on object storage (``location``)."""
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    location.write_bytes_atomic(path, text.encode())


def read_group_attrs(path: StorePath) -> dict[str, Any]:
    """Attributes of the zarr v3 group at ``path`` (read from its zarr.json)."""
    meta_path = path / "zarr.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise StoreFormatError(f"{path}: no zarr.json; this is not a zarr v3 group of a latent store.") from None
    except (OSError, ValueError) as e:
        raise StoreFormatError(f"{meta_path}: unreadable or corrupt JSON ({e}).") from e
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise StoreFormatError(f"{meta_path}: not a zarr v3 group (zarr_format/node_type).")
    return dict(meta.get("attributes") or {})


def require_attrs(path: StorePath, attrs: dict[str, Any], required: Iterable[str], what: str) -> None:
    missing = [k for k in required if k not in attrs]
    if missing:
        raise StoreFormatError(
            f"{path}: {what} group lacks attrs {missing}; the store is corrupt or was not written by "
            "openpi.latents.store (delete this group, or resume the run to rewrite it)."
        )


def is_store(root: str | pathlib.Path | location.ObjectPath) -> bool:
    root = location.as_path(root)
    try:
        return read_group_attrs(root).get("format") == FORMAT_NAME
    except StoreFormatError:
        return False


def scan_episode_dirs(root: StorePath) -> dict[int, dict[int, StorePath]]:
    """task_id -> episode_index -> group directory, from the directory names alone."""
    out: dict[int, dict[int, StorePath]] = {}
    for task_dir in sorted(root.iterdir()) if root.is_dir() else []:
        task_id = parse_task_group_name(task_dir.name)
        if task_id is None or not task_dir.is_dir():
            continue
        episodes = out.setdefault(task_id, {})
        for ep_dir in task_dir.iterdir():
            k = parse_episode_group_name(ep_dir.name)
            if k is not None and ep_dir.is_dir():
                episodes[k] = ep_dir
    return out


def read_store_manifest(root: StorePath) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run manifest (manifest.json) and root attrs of the store at ``root``; StoreFormatError naming the path
    if the root is not a latent store or its manifest is missing or corrupt."""
    attrs = read_group_attrs(root)
    if attrs.get("format") != FORMAT_NAME:
        raise StoreFormatError(f"{root}: root group attr format={attrs.get('format')!r}, expected {FORMAT_NAME!r}.")
    manifest_path = root / MANIFEST_FILE
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise StoreFormatError(f"{manifest_path}: missing; the store is incomplete or not a latent store.") from None
    except ValueError as e:
        raise StoreFormatError(f"{manifest_path}: corrupt JSON ({e}).") from e
    return manifest, attrs


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """What one record key holds per rollout step: shape, dtype name (numpy name or "string") and axis names."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    dims: tuple[str, ...]
    optional: bool

    @property
    def is_string(self) -> bool:
        return self.dtype == schema.STRING_DTYPE

    @property
    def layer_axis(self) -> int | None:
        """Axis of "layer" in the per-step shape (add 1 for the stored array), or None."""
        return self.dims.index("layer") if "layer" in self.dims else None

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(np.int32) if self.is_string else np.dtype(self.dtype)

    @property
    def step_nbytes(self) -> int:
        return schema.nbytes(self.shape, self.numpy_dtype)

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "dims": list(self.dims), "optional": self.optional}

    @classmethod
    def from_json(cls, key: str, data: Mapping[str, Any]) -> FieldSpec:
        return cls(key, tuple(data["shape"]), data["dtype"], tuple(data["dims"]), bool(data["optional"]))

    def describe(self) -> str:
        return f"shape {list(self.shape)} dtype {self.dtype}"


def dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == bf16.BF16 else dtype.name


def normalize_value(key: str, value: Any) -> np.ndarray | str:
    """A record value as a numpy array (or str). Writable arrays are copied (the caller may reuse its buffers);
    read-only ones (e.g. from ``jax.device_get``) are kept by reference and must not be changed afterwards."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        raise TypeError(f"record[{key!r}]: bytes are not supported; decode to str or pass a uint8 numpy array.")
    if isinstance(value, (bool, np.bool_)):
        return np.asarray(value, dtype=np.bool_)
    if isinstance(value, int):
        return np.asarray(value, dtype=np.int64)
    if isinstance(value, float):
        return np.asarray(value, dtype=np.float64)
    try:
        arr = np.asarray(value)
    except Exception as e:  # report which key failed
        raise TypeError(f"record[{key!r}]: cannot convert {type(value).__name__} to a numpy array: {e}") from e
    if arr.dtype != bf16.BF16 and arr.dtype.kind not in _SUPPORTED_KINDS:
        raise TypeError(
            f"record[{key!r}]: dtype {arr.dtype} is not supported (use bool/int/uint/float16/32/64/bfloat16 arrays, "
            "or a str for text)."
        )
    if arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C", copy=True)
    return arr


def field_spec_for(key: str, value: np.ndarray | str) -> FieldSpec:
    if isinstance(value, str):
        return FieldSpec(key, (), schema.STRING_DTYPE, (), schema.is_counterfactual(key))
    dims = schema.dims_for(key, value.ndim)
    return FieldSpec(key, tuple(value.shape), dtype_name(value.dtype), dims, schema.is_counterfactual(key))


def inner_chunk_shape(step_shape: tuple[int, ...], layer_axis: int, itemsize: int) -> tuple[int, ...]:
    """One layer per inner chunk; axes before the layer axis (denoising step) are split to 1 as well, innermost
    first, while the chunk stays >= MIN_INNER_CHUNK_BYTES (zarr-python costs ~0.5 ms per chunk on 2 cores)."""
    inner = list(step_shape)
    inner[layer_axis] = 1
    for axis in range(layer_axis - 1, -1, -1):
        candidate = inner.copy()
        candidate[axis] = 1
        if math.prod(candidate) * itemsize < MIN_INNER_CHUNK_BYTES:
            break
        inner = candidate
    return tuple(inner)


def array_create_kwargs(spec: FieldSpec) -> dict[str, Any]:
    """zarr.create_array arguments for ``spec``: shape (0, *shape), shard/chunk layout, codec, names, attrs."""
    dtype = spec.numpy_dtype
    step_shape = tuple(max(int(s), 1) for s in spec.shape)
    compressor = BloscCodec(cname="zstd", clevel=BLOSC_CLEVEL, shuffle="shuffle" if dtype.itemsize > 1 else "noshuffle")
    kwargs: dict[str, Any] = {
        "shape": (0, *spec.shape),
        "dtype": dtype,
        # crc32c of every (inner) chunk, checked by zarr on each decode: a flipped bit is an error, not wrong data.
        "compressors": (compressor, Crc32cCodec()),
        "fill_value": False if dtype == np.bool_ else 0,
        "dimension_names": ["step", *spec.dims],
        "attributes": {"dims": ["step", *spec.dims], "dtype": spec.dtype, "optional": spec.optional},
        # Every committed row gets a file, even one equal to the fill value, so a missing file is always damage.
        "config": {"write_empty_chunks": True},
    }
    if spec.is_string:
        kwargs["attributes"]["encoding"] = "string_table"
    layer = spec.layer_axis
    if layer is not None:
        kwargs["shards"] = (1, *step_shape)
        kwargs["chunks"] = (1, *inner_chunk_shape(step_shape, layer, dtype.itemsize))
    else:
        kwargs["chunks"] = (1, *step_shape)
    return kwargs


def row_chunk_key(spec: FieldSpec, row: int) -> str | None:
    """Path (relative to the episode group) of the one chunk (or shard) file holding ``row`` of ``spec``'s array,
    or None for a zero-size field (no file). Chunks and shards span one whole row (see array_create_kwargs) and
    zarr v3's default chunk key encoding is ``c/<i>/<j>/...``."""
    if any(int(s) == 0 for s in spec.shape):
        return None
    return f"{spec.key}/c/{int(row)}" + "/0" * len(spec.shape)


def legacy_row_checkable(spec: FieldSpec) -> bool:
    """Format 1 wrote no file for a chunk equal to the fill value (0), so an absent file there is only damage where
    an all-zero row cannot occur: floating-point arrays of >= 16 values per step (hidden states, attention, actions;
    not ints, bools, images or scalars)."""
    kind_float = spec.dtype == "bfloat16" or (not spec.is_string and np.dtype(spec.dtype).kind == "f")
    return kind_float and math.prod(spec.shape) >= 16
