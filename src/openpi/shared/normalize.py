"""Normalization statistics in openpi's ``norm_stats.json`` format.

The file looks like ``{"norm_stats": {"<key>": {"mean": [...], "std": [...], "q01": [...] | null,
"q99": [...] | null}}}``. Keys are '/'-flattened paths into a data dict (for LIBERO: ``state`` and ``actions``).
Stats are loaded as float64 numpy arrays, as openpi does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping

import numpy as np
from jaxtyping import Float

FILENAME = "norm_stats.json"


@dataclasses.dataclass(frozen=True, eq=False)
class NormStats:
    """Per-dimension statistics of one data key. q01/q99 are only needed for quantile normalization.

    Arrays are stored as float64. Equality is identity (arrays have no single truth value); compare fields with numpy.
    """

    mean: Float[np.ndarray, " d"]
    std: Float[np.ndarray, " d"]
    q01: Float[np.ndarray, " d"] | None = None
    q99: Float[np.ndarray, " d"] | None = None

    def __post_init__(self) -> None:
        for name in ("mean", "std", "q01", "q99"):
            value = getattr(self, name)
            if value is None:
                continue
            arr = np.asarray(value, dtype=np.float64)
            if arr.ndim != 1:
                raise ValueError(f"NormStats.{name} must be a 1-D array, got shape {arr.shape}.")
            object.__setattr__(self, name, arr)
        if self.mean.shape != self.std.shape:
            raise ValueError(f"NormStats mean {self.mean.shape} and std {self.std.shape} must have the same shape.")
        if (self.q01 is None) != (self.q99 is None):
            raise ValueError("NormStats q01 and q99 must be given together (or both left None).")
        if self.q01 is not None and not (self.q01.shape == self.q99.shape == self.mean.shape):
            raise ValueError(
                f"NormStats q01 {self.q01.shape} / q99 {self.q99.shape} must have the shape of mean {self.mean.shape}."
            )

    @property
    def has_quantiles(self) -> bool:
        return self.q01 is not None

    def to_json(self) -> dict:
        def _list(x):
            return None if x is None else [float(v) for v in x]

        return {"mean": _list(self.mean), "std": _list(self.std), "q01": _list(self.q01), "q99": _list(self.q99)}

    @classmethod
    def from_json(cls, data: Mapping, *, key: str = "?") -> NormStats:
        missing = [name for name in ("mean", "std") if data.get(name) is None]
        if missing:
            raise ValueError(
                f"Norm stats for key {key!r} lack required field(s) {missing}; each key needs mean and std."
            )
        return cls(mean=data["mean"], std=data["std"], q01=data.get("q01"), q99=data.get("q99"))


def serialize_json(norm_stats: Mapping[str, NormStats]) -> str:
    return json.dumps({"norm_stats": {k: v.to_json() for k, v in norm_stats.items()}}, indent=2)


def deserialize_json(text: str, *, source: str = "<string>") -> dict[str, NormStats]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source} is not valid JSON ({e}); expected openpi's norm_stats.json format.") from e
    if not isinstance(data, dict) or not isinstance(data.get("norm_stats"), dict):
        raise ValueError(
            f'{source} has no top-level "norm_stats" object; expected {{"norm_stats": {{"<key>": {{"mean": [...], '
            '"std": [...], "q01": ..., "q99": ...}}}}'
        )
    return {key: NormStats.from_json(value, key=key) for key, value in data["norm_stats"].items()}


def load(directory: str | os.PathLike) -> dict[str, NormStats]:
    """Read ``<directory>/norm_stats.json``."""
    path = pathlib.Path(directory) / FILENAME
    if not path.is_file():
        raise FileNotFoundError(
            f"Norm stats file {path} not found. A checkpoint keeps it at <ckpt>/assets/<asset_id>/{FILENAME}; "
            "check the directory (and the asset id)."
        )
    return deserialize_json(path.read_text(), source=str(path))


def save(directory: str | os.PathLike, norm_stats: Mapping[str, NormStats]) -> pathlib.Path:
    """Write ``<directory>/norm_stats.json`` (creating the directory); returns the file path."""
    path = pathlib.Path(directory) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(serialize_json(norm_stats))
    return path
