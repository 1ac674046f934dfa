"""An array's zarr.json against its commit record: a valid but wrong edit (dtype, byte order, shape) would read back
as wrong numbers, so readers and ``verify`` compare them when they open an array."""

from __future__ import annotations

from typing import Any

import zarr

from openpi.latents.store import format as sf


def _endians(node: Any) -> set[str]:
    """Byte orders named by the ``bytes`` codecs anywhere in an array's metadata dict (sharding nests them)."""
    if isinstance(node, dict):
        found = set()
        if node.get("name") == "bytes" and isinstance(node.get("configuration"), dict):
            found.add(str(node["configuration"].get("endian")))
        return found.union(*(_endians(v) for v in node.values()))
    if isinstance(node, (list, tuple)):
        return set().union(*(_endians(v) for v in node))
    return set()


def metadata_mismatch(spec: sf.FieldSpec, arr: zarr.Array, rows: int) -> str | None:
    """What in ``arr``'s metadata contradicts the commit record's ``spec`` (dtype, byte order, shape), or None."""
    if arr.dtype != spec.numpy_dtype:
        return f"dtype {arr.dtype}, the record says {spec.numpy_dtype}"
    if tuple(arr.shape[1:]) != tuple(spec.shape):
        return f"per-step shape {list(arr.shape[1:])}, the record says {list(spec.shape)}"
    if arr.shape[0] < rows:
        return f"{arr.shape[0]} rows, the record commits {rows}"
    endians = _endians(arr.metadata.to_dict()) - {"little", "None"}
    if endians and spec.numpy_dtype.itemsize > 1:
        return f"byte order {sorted(endians)}, the writer stores little-endian"
    return None
