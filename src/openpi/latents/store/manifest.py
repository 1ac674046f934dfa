"""Run manifest of a latent store: what produced the data, and whether a resumed run is the same run.

A manifest is a JSON object the caller fills with ``arguments``, ``capture_spec``, ``checkpoint`` (and anything else);
:func:`complete_manifest` adds ``code_version`` (``git describe``), ``created`` (UTC, ISO 8601) and ``content_hash``
(sha256 of the canonical JSON of the manifest without ``created`` and ``content_hash``: two runs with identical
settings and code share the hash). :func:`manifest_differences` lists what differs between a stored and a requested
manifest, as dotted paths, ignoring the fields that legitimately change on resume.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import importlib.metadata
import json
import math
import pathlib
import subprocess
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

# Fields that may differ between the original run and a resumed one (dotted paths).
DEFAULT_RESUME_IGNORE: frozenset[str] = frozenset(
    # arguments.jax_cache_dir: where compiled programs are cached changes nothing that is recorded.
    {"created", "content_hash", "code_version", "arguments.resume", "arguments.output_dir", "arguments.jax_cache_dir"}
)
_HASH_EXCLUDE = ("created", "content_hash")


def to_json_compatible(value: Any, *, where: str = "value") -> Any:
    """Converts dataclasses, tuples, numpy scalars/arrays, enums and paths to plain JSON types.

    Raises TypeError naming ``where`` (a dotted path) for anything else, so the caller knows which field to fix.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)  # JSON has no NaN/Infinity; keep the information as text
        return value
    if isinstance(value, np.generic):
        return to_json_compatible(value.item(), where=where)
    if isinstance(value, np.ndarray):
        return to_json_compatible(value.tolist(), where=where)
    if isinstance(value, enum.Enum):
        return to_json_compatible(value.value, where=where)
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: mapping key {k!r} is not a str; JSON metadata needs str keys.")
            out[k] = to_json_compatible(v, where=f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [to_json_compatible(v, where=f"{where}[{i}]") for i, v in enumerate(items)]
    raise TypeError(
        f"{where}: {type(value).__name__} is not JSON-serializable; pass str/int/float/bool/None, lists, dicts, "
        "numpy scalars or dataclasses of those."
    )


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def code_version() -> str:
    """``git describe --always --dirty --tags`` of this source tree, else the installed package version."""
    src = pathlib.Path(__file__).resolve().parent
    try:
        proc = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=src,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if proc.returncode == 0 and proc.stdout.strip():
            return f"git:{proc.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"openpi-latents {importlib.metadata.version('openpi-latents')}"
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def content_hash(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k not in _HASH_EXCLUDE}
    return "sha256:" + hashlib.sha256(canonical_json(body).encode()).hexdigest()


def complete_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-normalized copy of ``manifest`` with ``code_version``, ``created`` and ``content_hash`` filled in."""
    if not isinstance(manifest, Mapping):
        raise TypeError(f"manifest must be a dict (arguments, capture_spec, checkpoint, ...), got {type(manifest)}.")
    out = to_json_compatible(dict(manifest), where="manifest")
    out.setdefault("code_version", code_version())
    out.setdefault("created", datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    out["content_hash"] = content_hash(out)
    return out


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else k, out)
    else:
        out[prefix] = value


def manifest_differences(
    stored: Mapping[str, Any], requested: Mapping[str, Any], *, ignore: Collection[str] = DEFAULT_RESUME_IGNORE
) -> list[str]:
    """Human-readable differences ``"path: stored X, requested Y"``; fields under an ``ignore`` path are skipped."""
    flat_a: dict[str, Any] = {}
    flat_b: dict[str, Any] = {}
    _flatten(to_json_compatible(dict(stored)), "", flat_a)
    _flatten(to_json_compatible(dict(requested)), "", flat_b)

    def ignored(path: str) -> bool:
        return any(path == p or path.startswith(p + ".") for p in ignore)

    diffs = []
    missing = object()
    for path in sorted(set(flat_a) | set(flat_b)):
        if ignored(path):
            continue
        a, b = flat_a.get(path, missing), flat_b.get(path, missing)
        if a != b:
            shown_a = "<absent>" if a is missing else json.dumps(a)
            shown_b = "<absent>" if b is missing else json.dumps(b)
            diffs.append(f"{path}: stored {shown_a}, requested {shown_b}")
    return diffs
