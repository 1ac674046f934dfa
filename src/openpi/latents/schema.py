"""The latent record schema as the store keeps it: the record keys (their names, axes, dtype, stream and meaning are
defined once, in :mod:`openpi.shared.record_keys`, re-exported here) and the byte sizes of a record.

A record is one inference of one rollout step (docs/INTERFACES.md, "One collected rollout step").

Pure numpy / stdlib (``ml_dtypes`` only names bfloat16): reading a store must never import model code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from openpi.shared.record_keys import (
    ATTENTION_COUNT_GROUPS,
    ATTENTION_KEYS,
    CAPTURE_DTYPE,
    CF_PREFIX,
    CF_TF_PREFIX,
    RECORD_KEYS,
    STRING_DTYPE,
    RecordKey,
    Stream,
    base_key,
    counterfactual,
    dims_for,
    is_counterfactual,
    record_key,
    teacher_forced,
)

__all__ = [
    "ATTENTION_COUNT_GROUPS",
    "ATTENTION_KEYS",
    "CAPTURE_DTYPE",
    "CF_PREFIX",
    "CF_TF_PREFIX",
    "RECORD_KEYS",
    "STRING_DTYPE",
    "RecordKey",
    "Stream",
    "base_key",
    "counterfactual",
    "dims_for",
    "estimate_bytes",
    "format_bytes",
    "is_counterfactual",
    "nbytes",
    "record_key",
    "teacher_forced",
]


def nbytes(shape: tuple[int, ...] | list[int], dtype: Any) -> int:
    """Bytes of an array of ``shape`` and ``dtype`` (a numpy dtype, a dtype name incl. "bfloat16")."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        dtype = ml_dtypes.bfloat16
    return int(math.prod(shape)) * np.dtype(dtype).itemsize


def estimate_bytes(record: Mapping[str, Any]) -> int:
    """Uncompressed bytes one rollout step (one inference) adds to the store.

    ``record`` maps keys to arrays, to objects with ``shape``/``dtype`` (e.g. ``jax.ShapeDtypeStruct``) or to
    ``(shape, dtype)`` pairs; strings count 4 bytes (an index). Hidden states compress only ~1.2-1.4x, so this is
    close to the disk cost. Multiply by inferences per episode (max_steps / replan_steps) for an episode.
    """
    total = 0
    for value in record.values():
        if isinstance(value, str):
            total += 4
        elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (tuple, list)):
            total += nbytes(*value)
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            total += nbytes(value.shape, value.dtype)
        else:
            arr = np.asarray(value)
            total += nbytes(arr.shape, arr.dtype)
    return total


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"
