"""Where a store lives: a local directory (``pathlib.Path``) or a prefix on object storage (:class:`ObjectPath`).

``as_path("s3://bucket/prefix")`` / ``as_path("gs://bucket/prefix")`` gives an :class:`ObjectPath`, anything else a
``pathlib.Path``. ``ObjectPath`` has the small part of ``pathlib.Path``'s interface the store uses (``/``, ``name``,
``parent``, ``exists``, ``is_dir``, ``iterdir``, ``read_bytes``, ``write_bytes``, ...), backed by an fsspec
filesystem (s3fs: the ``s3`` extra; gcsfs: the ``gcs`` extra), so the writer, reader and verify run the same code on
both. The few operations that differ (an atomic whole-file write, removing a tree, the zarr store, checking that the
output can be written) are functions here that dispatch on the type.

Object storage has no rename and no directories: every object is written by one PUT, which is atomic (readers see
the old object or the new one, never a part) and, on S3 and GCS, strongly read-after-write consistent. That is all
the store's commit protocol needs (``commit``: data first, the commit record last in one PUT). "Directories" are key
prefixes; an empty one does not exist.

Configuration reaches the filesystem the standard way: for S3, botocore's credential chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles) and ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for an
S3-compatible server (MinIO, Ceph, moto), ``AWS_DEFAULT_REGION``; for GCS, application default credentials. Extra
fsspec options (JSON object) go in ``OPENPI_STORAGE_OPTIONS``, or construct ``ObjectPath.from_url(url,
storage_options)`` and pass it wherever a store path is taken. Listings are never cached (``use_listings_cache``
False): a reader must see episodes a writer adds.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import pathlib
import re
import uuid
from typing import Any

STORAGE_OPTIONS_ENV = "OPENPI_STORAGE_OPTIONS"
# protocol -> (fsspec package, the project extra that installs it)
_BACKENDS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}
_URL_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://(.*)$")


class ObjectStoreError(OSError):
    """Object storage cannot be used as asked (missing package, credentials or bucket); the message says the fix."""


def is_url(value: Any) -> bool:
    return isinstance(value, ObjectPath) or (isinstance(value, str) and _URL_RE.match(value) is not None)


def storage_options_from_env() -> dict[str, Any]:
    raw = os.environ.get(STORAGE_OPTIONS_ENV)
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{STORAGE_OPTIONS_ENV} is not valid JSON ({e}); give a JSON object of fsspec options.") from e
    if not isinstance(opts, dict):
        raise ValueError(f"{STORAGE_OPTIONS_ENV} must be a JSON object of fsspec options, got {raw!r}.")
    return opts


def _import_backend(protocol: str) -> None:
    if protocol not in _BACKENDS:
        raise ValueError(
            f"{protocol}:// is not a supported store location; use a local directory, s3://bucket/prefix or "
            "gs://bucket/prefix."
        )
    package, extra = _BACKENDS[protocol]
    try:
        __import__(package)
    except ImportError:
        raise ObjectStoreError(
            f"{protocol}:// needs the {package} package, which is not installed: run `uv sync --extra {extra}` (or "
            f"`pip install {package}`)."
        ) from None


@functools.cache
def _filesystem(protocol: str, options_json: str, asynchronous: bool):
    import fsspec

    opts = {"use_listings_cache": False, **json.loads(options_json)}
    fs = fsspec.filesystem(protocol, asynchronous=asynchronous, skip_instance_cache=True, **opts)
    if asynchronous:
        atexit.register(_close_async_session, fs)
    return fs


def _close_async_session(fs) -> None:
    """Closes the HTTP session of an asynchronous s3fs instance on zarr's loop at exit (s3fs closes only those of
    synchronous instances; otherwise aiohttp prints "Unclosed client session")."""
    creator = getattr(fs, "_s3creator", None)
    if creator is None or not hasattr(creator, "__aexit__"):
        return
    try:
        from zarr.core.sync import sync

        sync(creator.__aexit__(None, None, None), timeout=5)
    except Exception:  # exiting anyway
        pass


class ObjectPath:
    """A key prefix (or key) on object storage, with the ``pathlib.Path`` methods the store uses."""

    def __init__(self, protocol: str, path: str, options: dict[str, Any] | None = None, *, kind: str | None = None):
        self.protocol = protocol
        self.path = path.strip("/")
        self.options = dict(options or {})
        self._kind = kind  # "file" / "directory" when known from a listing (saves a request in is_dir/is_file)

    @classmethod
    def from_url(cls, url: str, storage_options: dict[str, Any] | None = None) -> ObjectPath:
        m = _URL_RE.match(url)
        if m is None:
            raise ValueError(f"{url!r} is not a URL (expected s3://bucket/prefix or gs://bucket/prefix).")
        protocol, path = m.group(1).lower(), m.group(2)
        _import_backend(protocol)
        if not path.strip("/"):
            raise ValueError(f"{url!r} names no bucket; use {protocol}://bucket/prefix.")
        opts = {**storage_options_from_env(), **(storage_options or {})}
        return cls(protocol, path, opts)

    # --- the filesystem -------------------------------------------------------------------------------
    @property
    def fs(self):
        """The synchronous fsspec filesystem (one per protocol and options, listings uncached)."""
        return _filesystem(self.protocol, json.dumps(self.options, sort_keys=True), False)

    def async_fs(self):
        """A new asynchronous instance, for zarr's FsspecStore (it runs on zarr's own event loop)."""
        return _filesystem(self.protocol, json.dumps(self.options, sort_keys=True), True)

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    # --- pathlib-like ---------------------------------------------------------------------------------
    def _child(self, path: str, kind: str | None = None) -> ObjectPath:
        return ObjectPath(self.protocol, path, self.options, kind=kind)

    def __truediv__(self, other: str | os.PathLike) -> ObjectPath:
        return self._child(f"{self.path}/{str(other).strip('/')}")

    def __str__(self) -> str:
        return f"{self.protocol}://{self.path}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and (self.protocol, self.path) == (other.protocol, other.path)

    def __lt__(self, other: ObjectPath) -> bool:
        return self.path < other.path

    def __hash__(self) -> int:
        return hash((self.protocol, self.path))

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rindex(".") :] if "." in name.lstrip(".") else ""

    @property
    def parent(self) -> ObjectPath:
        return self._child(self.path.rsplit("/", 1)[0]) if "/" in self.path else self

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def expanduser(self) -> ObjectPath:
        return self

    def absolute(self) -> ObjectPath:
        return self

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_dir(self) -> bool:
        return self._kind == "directory" if self._kind else self.fs.isdir(self.path)

    def is_file(self) -> bool:
        return self._kind == "file" if self._kind else self.fs.isfile(self.path)

    def iterdir(self) -> list[ObjectPath]:
        """The direct children (objects and prefixes); empty if there are none."""
        try:
            entries = self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for e in entries:
            name = e["name"].rstrip("/")
            if name != self.path:
                out.append(self._child(name, "directory" if e["type"] == "directory" else "file"))
        return out

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """One PUT: atomic (the object is replaced whole or not at all)."""
        self.fs.pipe_file(self.path, bytes(data))

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def open(self, mode: str = "rb"):
        return self.fs.open(self.path, mode)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a prefix exists once an object is written under it."""


StorePath = pathlib.Path | ObjectPath


def as_path(root: str | os.PathLike | ObjectPath) -> StorePath:
    """``s3://`` / ``gs://`` URLs (and ObjectPaths) -> :class:`ObjectPath`; anything else -> ``pathlib.Path``."""
    if isinstance(root, ObjectPath):
        return root
    if isinstance(root, str) and _URL_RE.match(root):
        if root.startswith("file://"):
            return pathlib.Path(root[len("file://") :])
        return ObjectPath.from_url(root)
    return pathlib.Path(root)


def is_remote(path: StorePath) -> bool:
    return isinstance(path, ObjectPath)


def write_bytes_atomic(path: StorePath, data: bytes) -> None:
    """Replaces the file ``path`` in one atomic step: temp file + rename locally, a single PUT on object storage."""
    if isinstance(path, ObjectPath):
        path.write_bytes(data)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def remove_tree(path: StorePath) -> None:
    """Deletes the folder (or every object under the prefix) ``path``."""
    if isinstance(path, ObjectPath):
        try:
            path.fs.rm(path.path, recursive=True)
        except FileNotFoundError:
            pass
        return
    import shutil

    shutil.rmtree(path)


def move_tree(src: StorePath, dst: StorePath) -> None:
    """Moves the folder (or every object under the prefix) ``src`` to ``dst``, which must not exist."""
    if isinstance(src, ObjectPath):
        src.fs.mv(src.path, dst.path, recursive=True)
        return
    os.rename(src, dst)


def missing_files(base: StorePath, relative: list[str]) -> list[str]:
    """The entries of ``relative`` (paths under ``base``) that do not exist: one stat each locally; on object
    storage one request each for a few files, else one listing of their common folder under ``base``."""
    if not relative:
        return []
    if not isinstance(base, ObjectPath):
        return [r for r in relative if not os.path.exists(base / r)]
    if len(relative) <= _MAX_SINGLE_CHECKS:
        return [r for r in relative if not base.fs.exists(f"{base.path}/{r}")]
    common = os.path.commonpath(relative) if len(relative) > 1 else os.path.dirname(relative[0])
    folder = f"{base.path}/{common}".rstrip("/")
    try:
        present = {p[len(base.path) + 1 :] for p in base.fs.find(folder)}
    except FileNotFoundError:
        present = set()
    return [r for r in relative if r not in present]


_MAX_SINGLE_CHECKS = 4


def zarr_store(path: StorePath, *, read_only: bool, store_class: type | None = None):
    """A zarr store rooted at ``path``: ``LocalStore`` or ``FsspecStore`` (or ``store_class``, a subclass of the
    right one)."""
    from zarr.storage import FsspecStore, LocalStore

    if isinstance(path, ObjectPath):
        cls = store_class or FsspecStore
        return cls(fs=path.async_fs(), path=path.path, read_only=read_only)
    return (store_class or LocalStore)(path, read_only=read_only)


def check_object_store_writable(root: ObjectPath) -> ObjectPath:
    """Writes and deletes a probe object under ``root``; raises :class:`ObjectStoreError` naming the problem and
    the fix (no credentials, no such bucket, access denied, endpoint unreachable)."""
    probe = root / f".write_probe_{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)
    except Exception as e:  # the backends raise many types; classify by name/message
        raise describe_access_error(root, e) from e
    return root


def describe_access_error(root: ObjectPath, e: BaseException) -> ObjectStoreError:
    text = f"{type(e).__name__}: {e}"
    if "NoCredentials" in type(e).__name__ or ("credentials" in str(e).lower() and "locate" in str(e).lower()):
        hint = (
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for the account that owns the bucket"
            if root.protocol.startswith("s3")
            else "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
        )
        return ObjectStoreError(f"{root}: no object-storage credentials found ({text}); {hint}.")
    if isinstance(e, FileNotFoundError) or "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return ObjectStoreError(
            f"{root}: the bucket {root.bucket!r} does not exist ({text}); create it first (e.g. `aws s3 mb "
            f"{root.protocol}://{root.bucket}`), or check the name and the endpoint (AWS_ENDPOINT_URL_S3 / "
            "AWS_ENDPOINT_URL for an S3-compatible server)."
        )
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return ObjectStoreError(
            f"{root}: access denied ({text}); the credentials in use may not write this bucket/prefix."
        )
    if "connect" in text.lower() or "endpoint" in text.lower():
        return ObjectStoreError(
            f"{root}: cannot reach the object store ({text}); check the network and AWS_ENDPOINT_URL_S3 / "
            "AWS_ENDPOINT_URL."
        )
    return ObjectStoreError(f"{root}: cannot write to the object store ({text}).")
