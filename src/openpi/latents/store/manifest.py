"""Run manifest of a latent store: what produced the data, and whether a resumed run is the same run.

:class:`RunManifest` is the one type of it: every producer (the collection, the policy server, the replay, the
synthetic collection) builds one and every reader reads one (``LatentStore.run_manifest``, or
:meth:`RunManifest.of` on the JSON a pickle or a caller holds); nothing else reads the manifest's keys. On disk it is
the JSON object of :meth:`RunManifest.to_json` (``manifest.json`` and the root attr ``manifest``); every field is
optional, so the manifests of earlier formats still read (:data:`MANIFEST_VERSION`).
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

# Fields that may differ between the original run and a resumed one (dotted paths). A store of an earlier manifest
# version resumes under the same settings: the version says how the JSON is spelled, not what the run does.
DEFAULT_RESUME_IGNORE: frozenset[str] = frozenset(
    # arguments.jax_cache_dir: where compiled programs are cached changes nothing that is recorded.
    {
        "created",
        "content_hash",
        "code_version",
        "manifest_version",
        "arguments.resume",
        "arguments.output_dir",
        "arguments.jax_cache_dir",
    }
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


# 1: stores written before the manifest carried a version (no "manifest_version" key; read as version 1, and
#    written back without one). Earlier stores of version 1 may lack any key (condition, segment_names, ...).
# 2: the same keys, plus "manifest_version" (this module writes it; a None field is left out rather than null).
MANIFEST_VERSION = 2


@dataclasses.dataclass(frozen=True)
class RunManifest:
    """What produced a store, one field per key a producer writes; every field is optional (a store of an earlier
    format, a pickle or a test may lack any of them). Keys this type does not name are kept in ``extra``."""

    kind: str | None = None  # which producer: "pi0 LIBERO latent collection", "pi0 latent policy server", ...
    arguments: Mapping[str, Any] | None = None  # the producer's arguments (its CLI dataclass as JSON)
    capture_spec: Mapping[str, Any] | None = None  # CaptureSpec.to_dict() (models' CaptureSpec.from_dict reads it)
    checkpoint: str | None = None  # the model's checkpoint, or "random(seed=N)" for a preset run without weights
    preset: str | None = None  # the policy preset
    model_config: str | None = None  # Pi0Config.describe()
    suite: str | None = None  # the task suite ("synthetic" for the synthetic collection)
    max_steps: int | None = None  # env steps per episode
    text_start: int | None = None  # first text position of the prefix
    segment_names: tuple[str, ...] | None = None  # the prefix's segments: each camera, then "text"
    suffix_segment_names: tuple[str, ...] | None = None  # the action expert's tokens ("state" first on pi0)
    condition: Mapping[str, Any] | None = None  # the collection's closed-loop condition (Condition.describe())
    intervention: Mapping[str, Any] | None = None  # the server's --intervention (intervention.describe())
    record_fields: Mapping[str, Any] | None = None  # the server's request fields (protocol.RECORD_FIELDS)
    connections_task_id: int | None = None  # the server's connection-mode pseudo-task
    control_of: Mapping[str, Any] | None = None  # a replay's source: store, content_hash, checkpoint, preset, ...
    replay: Mapping[str, Any] | None = None  # how a replay made its control (model, init_seed, norm stats, ...)
    code_version: str | None = None  # filled by complete_manifest
    created: str | None = None
    content_hash: str | None = None
    manifest_version: int = MANIFEST_VERSION
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # keys of no field above, as stored

    def __post_init__(self) -> None:
        for name in ("segment_names", "suffix_segment_names"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        clash = sorted(set(self.extra) & _FIELD_NAMES)
        if clash:
            raise ValueError(f"RunManifest.extra holds {clash}, which are fields: pass them as fields.")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunManifest:
        """The manifest of a stored JSON object, of any version up to :data:`MANIFEST_VERSION`."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a run manifest is a JSON object, got {type(data).__name__}.")
        version = data.get("manifest_version", 1)
        if not isinstance(version, int) or not 1 <= version <= MANIFEST_VERSION:
            raise ValueError(
                f"run manifest version {version!r}: this code reads versions 1..{MANIFEST_VERSION}; a newer one was "
                "written by newer code (update openpi to read it)."
            )
        known = {k: v for k, v in data.items() if k in _FIELD_NAMES}
        extra = {k: v for k, v in data.items() if k not in _FIELD_NAMES}
        return cls(**{**known, "manifest_version": version}, extra=extra)

    @classmethod
    def of(cls, value: RunManifest | Mapping[str, Any] | None) -> RunManifest:
        """``value`` as a RunManifest: itself, the manifest of its JSON, or the empty manifest for None."""
        if isinstance(value, RunManifest):
            return value
        return cls.from_json(value or {})

    def to_json(self) -> dict[str, Any]:
        """The JSON object the store keeps (fields that are None left out; ``extra`` as it was)."""
        out = to_json_compatible(dict(self.extra), where="manifest")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and value is not None:
                out[f.name] = to_json_compatible(value, where=f"manifest.{f.name}")
        if self.manifest_version == 1:  # version 1 had no version key: its JSON comes back as it was stored
            del out["manifest_version"]
        return out

    def updated(self, entries: Mapping[str, Any]) -> RunManifest:
        """This manifest with ``entries`` set: a field's name sets the field, any other key goes into ``extra``."""
        fields = {k: v for k, v in entries.items() if k in _FIELD_NAMES}
        extra = {**self.extra, **{k: v for k, v in entries.items() if k not in _FIELD_NAMES}}
        return dataclasses.replace(self, **fields, extra=extra)

    def __bool__(self) -> bool:
        """False for the empty manifest (no run manifest: an older pickle, in-memory task data)."""
        return any(k != "manifest_version" for k in self.to_json())

    def argument(self, name: str, default: Any = None) -> Any:
        """The producer's argument ``name`` (``default`` when the manifest does not record it)."""
        return (self.arguments or {}).get(name, default)

    def capture(self, name: str, default: Any = None) -> Any:
        """The capture spec's entry ``name`` (``default`` without a capture spec or the entry)."""
        return (self.capture_spec or {}).get(name, default)

    def condition_entry(self, name: str, default: Any = None) -> Any:
        """The condition's entry ``name`` (``default`` for a store without a condition)."""
        return (self.condition or {}).get(name, default)

    def control_entry(self, name: str, default: Any = None) -> Any:
        """The ``control_of`` entry ``name`` of a replay (``default`` for a store that is no control)."""
        return (self.control_of or {}).get(name, default)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(RunManifest)) - {"extra"}


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


def complete_manifest(manifest: RunManifest | Mapping[str, Any]) -> dict[str, Any]:
    """JSON-normalized copy of ``manifest`` with ``code_version``, ``created`` and ``content_hash`` filled in."""
    if isinstance(manifest, RunManifest):
        manifest = manifest.to_json()
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
    stored: RunManifest | Mapping[str, Any],
    requested: RunManifest | Mapping[str, Any],
    *,
    ignore: Collection[str] = DEFAULT_RESUME_IGNORE,
) -> list[str]:
    """Human-readable differences ``"path: stored X, requested Y"``; fields under an ``ignore`` path are skipped."""
    stored, requested = (m.to_json() if isinstance(m, RunManifest) else m for m in (stored, requested))
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
        null_vs_absent = (a is None and b is missing) or (a is missing and b is None)
        if a != b and not null_vs_absent:  # null and absent mean the same (RunManifest leaves None out)
            shown_a = "<absent>" if a is missing else json.dumps(a)
            shown_b = "<absent>" if b is missing else json.dumps(b)
            diffs.append(f"{path}: stored {shown_a}, requested {shown_b}")
    return diffs
