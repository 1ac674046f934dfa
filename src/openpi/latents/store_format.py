"""On-disk conventions of the latent store, shared by the writer and the reader.

Layout (zarr v3, local directory)::

    <root>/zarr.json                     root group; attrs: format, format_version, manifest, resumes
    <root>/manifest.json                 the run manifest (same content as the root attr "manifest")
    <root>/task_{id:03d}/                group; attrs: task_id, task_name, suite, language (+ caller extras)
    <root>/task_{id:03d}/episode_{k}/    group; attrs: see EPISODE_* below + caller attrs + finish() metadata
    <root>/task_{id:03d}/episode_{k}/<key>   one array per record key, leading axis = rollout step

Every array stores its axis names as zarr ``dimension_names`` and as the attr ``dims`` (``["step", ...]``).
Arrays with a layer axis are sharded one shard per rollout step, with inner chunks of one layer (and of one
denoising step where that keeps chunks >= 512 KiB), so one layer can be read across steps without reading whole steps.
Others are one chunk per rollout step. All chunks are compressed with blosc(zstd level 1, byte shuffle).

String values (``prompt``, ``cf_prompt``, ...) are stored as int32 arrays of indices into the episode attr
``string_tables[key]`` (readable without zarr's non-standard string types, e.g. by tensorstore).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
from zarr.codecs import BloscCodec

from openpi.latents import zarr_bf16

FORMAT_NAME = "openpi-latents-store"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"

# Episode attrs owned by the store (callers cannot set them through begin_episode/finish).
EPISODE_COMMITTED = "committed_steps"  # number of rollout steps fully written: readers trust this, not array shapes
EPISODE_COMPLETE = "complete"  # True only after finish() and after all steps were written
EPISODE_STEP_T = "step_t"  # env timestep t of each committed rollout step
EPISODE_FIELDS = "fields"  # key -> FieldSpec JSON (fixed by the first occurrence of the key)
EPISODE_SPARSE = "sparse_steps"  # optional key -> rollout-step indices where it is present (row i <-> step list[i])
EPISODE_STRINGS = "string_tables"  # string key -> list of distinct values (the array holds indices)
RESERVED_EPISODE_ATTRS = frozenset(
    {EPISODE_COMMITTED, EPISODE_COMPLETE, EPISODE_STEP_T, EPISODE_FIELDS, EPISODE_SPARSE, EPISODE_STRINGS}
)
TASK_REQUIRED_ATTRS = ("task_id", "task_name", "suite", "language")

# Keys with this prefix may be missing on some steps (counterfactual reruns); all other keys of the first step are
# required on every step.
OPTIONAL_PREFIXES = ("cf_",)
STRING_DTYPE = "string"
BLOSC_CLEVEL = 1  # zstd level: hidden states barely compress (1.28x at 1, 1.34x at 3) and 3 is ~2x slower
MIN_INNER_CHUNK_BYTES = 512 * 1024  # axes before the layer axis are split only while inner chunks stay this big

# Per-step axis names of the record keys (docs/INTERFACES.md). A key "cf_<name>" uses the axes of "<name>".
KNOWN_DIMS: dict[str, tuple[str, ...]] = {
    "expert_0_hidden_states": ("layer", "batch", "token", "width"),
    "expert_0_segment_means": ("layer", "batch", "segment", "width"),
    "text_only_hidden_states": ("layer", "batch", "token", "width"),
    "text_mask": ("batch", "token"),
    "tokenized_prompt": ("batch", "token"),
    "expert_1_hidden_states": ("denoise_step", "layer", "batch", "token", "width"),
    "expert_1_segment_means": ("denoise_step", "layer", "batch", "segment", "width"),
    "attention_to_text": ("denoise_step", "layer", "batch", "head", "query"),
    "expert_1_modulation": ("denoise_step", "layer", "batch", "norm", "component", "width"),  # pi0.5
    "adarms_cond": ("denoise_step", "batch", "width"),  # pi0.5
    "denoise_times": ("denoise_step",),
    "x_t": ("denoise_point", "batch", "horizon", "action_dim"),
    "v_t": ("denoise_step", "batch", "horizon", "action_dim"),
    "actions": ("horizon", "action_dim"),
    "executed_actions": ("executed", "action_dim"),
    "model_actions": ("horizon", "model_action_dim"),
    "image": ("height", "width", "channel"),
    "wrist_image": ("height", "width", "channel"),
    "state": ("state_dim",),
}

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


def is_optional_key(key: str) -> bool:
    return key.startswith(OPTIONAL_PREFIXES)


def dims_for(key: str, ndim: int) -> tuple[str, ...]:
    """Per-step axis names of ``key`` (without the leading "step" axis); generic names for unknown keys."""
    base = key
    for prefix in OPTIONAL_PREFIXES:
        if base.startswith(prefix):
            base = base[len(prefix) :]
    dims = KNOWN_DIMS.get(base)
    if dims is not None and len(dims) == ndim:
        return dims
    return tuple(f"dim_{i}" for i in range(ndim))


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
        return self.dtype == STRING_DTYPE

    @property
    def layer_axis(self) -> int | None:
        """Axis of "layer" in the per-step shape (add 1 for the stored array), or None."""
        return self.dims.index("layer") if "layer" in self.dims else None

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(np.int32) if self.is_string else np.dtype(self.dtype)

    @property
    def step_nbytes(self) -> int:
        return int(math.prod(self.shape)) * self.numpy_dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "dims": list(self.dims), "optional": self.optional}

    @classmethod
    def from_json(cls, key: str, data: Mapping[str, Any]) -> FieldSpec:
        return cls(key, tuple(data["shape"]), data["dtype"], tuple(data["dims"]), bool(data["optional"]))

    def describe(self) -> str:
        return f"shape {list(self.shape)} dtype {self.dtype}"


def dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == zarr_bf16.BF16 else dtype.name


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
    if arr.dtype != zarr_bf16.BF16 and arr.dtype.kind not in _SUPPORTED_KINDS:
        raise TypeError(
            f"record[{key!r}]: dtype {arr.dtype} is not supported (use bool/int/uint/float16/32/64/bfloat16 arrays, "
            "or a str for text)."
        )
    if arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C", copy=True)
    return arr


def field_spec_for(key: str, value: np.ndarray | str) -> FieldSpec:
    if isinstance(value, str):
        return FieldSpec(key, (), STRING_DTYPE, (), is_optional_key(key))
    return FieldSpec(key, tuple(value.shape), dtype_name(value.dtype), dims_for(key, value.ndim), is_optional_key(key))


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
        "compressors": compressor,
        "fill_value": False if dtype == np.bool_ else 0,
        "dimension_names": ["step", *spec.dims],
        "attributes": {"dims": ["step", *spec.dims], "dtype": spec.dtype, "optional": spec.optional},
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


def estimate_bytes(record: Mapping[str, Any]) -> int:
    """Uncompressed bytes one rollout step (one inference) adds to the store.

    ``record`` maps keys to arrays, to objects with ``shape``/``dtype`` (e.g. ``jax.ShapeDtypeStruct``) or to
    ``(shape, dtype)`` pairs; strings count 4 bytes (an index). Hidden states compress only ~1.2-1.4x, so this is
    close to the disk cost. Multiply by inferences per episode (max_steps / replan_steps) for an episode.
    """
    total = 0
    for key, value in record.items():
        if isinstance(value, str):
            total += 4
            continue
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (tuple, list)):
            shape, dtype = value
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            shape, dtype = value.shape, value.dtype
        else:
            arr = normalize_value(key, value)
            shape, dtype = np.shape(arr), np.asarray(arr).dtype
        if dtype == "bfloat16":
            dtype = ml_dtypes.bfloat16
        total += int(math.prod(shape)) * np.dtype(dtype).itemsize
    return total


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
