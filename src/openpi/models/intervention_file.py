"""An `Intervention` from a JSON file (the collection's ``--condition.intervention`` and the server's
``--intervention``).

Format: ``{"ops": [{"op": <name>, ...keyword arguments of that constructor...}, ...]}`` with the names and
arguments of `openpi.models.intervention` (`knockout_attention` (alias ``knockout``; ``denoise_steps`` for expert-1
queries), `knockout_language` (no arguments: language removed entirely), `patch`, `ablate`, `steer`); the ops are
combined in order. Token spans are a segment name or ``[start, stop]``. Array arguments (``values``,
``mean``, ``vector``) are nested lists, ``{"npy": "<path>"}`` or a ``"<path>.npy"`` string (relative to the JSON
file). Example::

    {"ops": [{"op": "knockout_attention", "queries": "all", "keys": "text"},
             {"op": "steer", "expert": 1, "tokens": "actions", "layers": [3], "vector": {"npy": "v.npy"},
              "alpha": 2.0}]}
"""

from __future__ import annotations

import inspect
import json
import pathlib
from typing import Any

import numpy as np

from openpi.models import intervention as iv

OPS = {
    "knockout_attention": iv.knockout_attention,
    "knockout": iv.knockout_attention,
    "knockout_language": iv.knockout_language,
    "patch": iv.patch,
    "ablate": iv.ablate,
    "steer": iv.steer,
}
ARRAY_ARGS = ("values", "mean", "vector")


def _array(value: Any, base: pathlib.Path, where: str) -> np.ndarray:
    if isinstance(value, str):
        value = {"npy": value}
    if isinstance(value, dict):
        if set(value) != {"npy"}:
            raise ValueError(f"{where}: an array is a nested list or {{'npy': '<path>'}}, got keys {sorted(value)}.")
        path = base / value["npy"]
        if not path.is_file():
            raise FileNotFoundError(f"{where}: {path} does not exist.")
        return np.load(path, allow_pickle=False)
    return np.asarray(value, dtype=np.float32)


def _op(spec: Any, base: pathlib.Path, where: str) -> iv.Intervention:
    if not isinstance(spec, dict) or "op" not in spec:
        raise ValueError(f"{where} must be an object with an 'op' key ({sorted(OPS)}), got {spec!r}.")
    kwargs = dict(spec)
    name = kwargs.pop("op")
    fn = OPS.get(name)
    if fn is None:
        raise ValueError(f"{where}: unknown op {name!r}; use one of {sorted(OPS)}.")
    allowed = set(inspect.signature(fn).parameters)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"{where} ({name}): unknown arguments {unknown}; {name} takes {sorted(allowed)}.")
    for key in ARRAY_ARGS:
        if kwargs.get(key) is not None:
            kwargs[key] = _array(kwargs[key], base, f"{where}.{key}")
    for key in ("tokens", "queries", "keys"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    try:
        return fn(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where} ({name}): {e}") from e


def load_intervention(path: str | pathlib.Path, *, flag: str = "--intervention") -> iv.Intervention:
    """Reads an intervention JSON file; ValueError / FileNotFoundError name the flag, the file and the problem."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} {path} is not valid JSON: {e}") from e
    ops = data.get("ops") if isinstance(data, dict) else None
    if not isinstance(ops, list) or not ops:
        raise ValueError(f"{flag} {path} must be an object with a non-empty list 'ops'.")
    return iv.combine(*(_op(spec, path.parent, f"{path.name} ops[{i}]") for i, spec in enumerate(ops)))
