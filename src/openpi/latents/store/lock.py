"""Exclusive lock files: one writer per store now, one owner per episode later.

A lock is a small JSON file created exclusively (written to a temp file, then ``os.link``-ed into place, so it
appears complete or not at all; on object storage :class:`ObjectLock` uses a conditional PUT instead)::

    {"host": "node-3", "pid": 12345, "pid_start": 98765432, "boot_id": "...", "started": "2025-01-01T10:00:00+00:00",
     "token": "<uuid4 hex>", "purpose": "writer", "pid_ns": "pid:[4026531836]"}

The store writer holds ``<root>/writer.lock`` from ``create_or_open`` to ``close``. A lock is *stale* when its holder
ran on this host, in this PID namespace, and is gone: no process with that pid, or one started at another time (pid
reused), or the machine rebooted since (``boot_id``). A lock from another PID namespace (``pid_ns``: another
container on the same host, whose pids mean other processes) cannot be judged, like one from another host. A live lock refuses the second writer; a stale one is broken only when asked
(``break_stale_lock=True``, the collection's ``--break-stale-lock``); a lock from another host is never judged (its
message says which file to delete once that host's writer is known to be gone). Many workers later: each takes the
store lock only briefly to update shared files (manifest, root attrs) and holds one lock per episode it writes
(``<task>/episode_<k>.claim``), made with this same class.

On object storage (``s3://``, ``gs://``; :class:`ObjectLock`) there is no ``link``: the lock object is created with
a *conditional* PUT that fails if the object exists (S3 ``If-None-Match: *``, s3fs ``mode="create"``; GCS
``ifGenerationMatch=0`` where gcsfs implements ``mode="create"``), which is as exclusive as ``os.link``. Where the
filesystem has no conditional create (fsspec's generic fallback checks, then writes), the lock is *best effort*: two
writers starting within the same second may both get it; a warning says so. Breaking a stale lock on object storage
is itself exclusive: the breaker first creates a *takeover record* ``.writer.lock.takeover-<crc32 of the stale lock's
bytes>`` with the same conditional PUT, so of several processes breaking the same stale lock only one may delete it;
that one re-reads the lock after creating the record and deletes it only if it still has the judged bytes (so a
breaker that comes late, after the record was removed, finds the new lock and stops). The others are refused with
"another process is taking over". A takeover record left by a breaker that died is named in that message.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import logging
import os
import pathlib
import socket
import uuid
import zlib
from typing import Any

from openpi.latents.store import location

logger = logging.getLogger(__name__)


class StoreLockedError(FileExistsError):
    """Another writer holds the lock (or a stale lock was not broken); the message names holder, file and fix."""


@dataclasses.dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    pid_start: int | None
    boot_id: str | None
    started: str
    token: str
    purpose: str
    pid_ns: str | None = None  # the holder's PID namespace (/proc/self/ns/pid); None in locks written before

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host!r} (started {self.started})"


def _pid_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (/proc/<pid>/stat field 22), None if unknown."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _me(purpose: str) -> LockHolder:
    return LockHolder(
        host=socket.gethostname(),
        pid=os.getpid(),
        pid_start=_pid_start(os.getpid()),
        boot_id=_boot_id(),
        started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        token=uuid.uuid4().hex,
        purpose=purpose,
        pid_ns=_pid_namespace(),
    )


def read_holder(path: location.StorePath) -> LockHolder | None:
    """The holder recorded in lock file ``path``; None if there is none. Unparsable content raises ValueError."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    try:
        return LockHolder(
            str(data["host"]),
            int(data["pid"]),
            data.get("pid_start"),
            data.get("boot_id"),
            str(data.get("started", "?")),
            str(data["token"]),
            str(data.get("purpose", "writer")),
            data.get("pid_ns"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a lock file ({e})") from e


def holder_is_stale(holder: LockHolder) -> bool | None:
    """True: the holder ran on this host and is gone. False: it is alive. None: another host or PID namespace,
    cannot tell."""
    if holder.host != socket.gethostname():
        return None
    if holder.pid_ns and _pid_namespace() and holder.pid_ns != _pid_namespace():
        return None  # its pid names another process here (containers sharing the host network)
    if holder.boot_id and _boot_id() and holder.boot_id != _boot_id():
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, owned by another user
    start = _pid_start(holder.pid)
    return holder.pid_start is not None and start is not None and start != holder.pid_start


class FileLock:
    """An exclusive lock file at ``path`` (see the module docstring); ``acquire`` then ``release``."""

    def __init__(self, path: str | location.StorePath, *, purpose: str = "writer", what: str = "store"):
        self.path = location.as_path(path)
        self.purpose = purpose
        self.what = what  # for messages: "store /data/run"
        self.holder: LockHolder | None = None

    def check(self, *, break_stale: bool = False) -> None:
        """Raises :class:`StoreLockedError` if acquiring would fail (a live lock; a stale one without
        ``break_stale``); writes nothing. An unparsable lock file is treated like a stale one."""
        try:
            holder = read_holder(self.path)
        except ValueError:
            if not break_stale:
                raise StoreLockedError(
                    f"{self.path}: the writer lock of {self.what} is unreadable (a crash while it was taken?). If no "
                    "other writer runs, pass --break-stale-lock (break_stale_lock=True) or delete the file."
                ) from None
            return
        if holder is None:
            return
        stale = holder_is_stale(holder)
        if stale is False:
            raise StoreLockedError(
                f"{self.what} is being written by {holder.describe()} (lock file {self.path}). Only one writer may "
                "use a store: wait for it to finish, or write to another --output-dir."
            )
        if stale is None:
            where = "another host" if holder.host != socket.gethostname() else f"another PID namespace ({holder.pid_ns})"
            raise StoreLockedError(
                f"{self.what} is locked by {holder.describe()}, {where}, whose process cannot be checked from "
                f"here (--break-stale-lock never breaks such a lock). If no writer runs there any more, delete "
                f"{self.path} and retry."
            )
        if not break_stale:
            raise StoreLockedError(
                f"{self.what} has a stale writer lock from {holder.describe()}, which is no longer running (it "
                f"crashed or was killed). Pass --break-stale-lock (break_stale_lock=True) to take it over, after "
                f"checking no other writer uses this store; or delete {self.path}."
            )

    def acquire(self, *, break_stale: bool = False) -> LockHolder:
        me = _me(self.purpose)
        tmp = self.path.with_name(f".{self.path.name}.{me.token}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(me), indent=2) + "\n")
        try:
            for _ in range(2):
                try:
                    os.link(tmp, self.path)  # atomic and exclusive: fails if a lock exists
                    self.holder = me
                    return me
                except FileExistsError:
                    self.check(break_stale=break_stale)  # raises unless it is stale and may be broken
                    self._break_stale()
            raise StoreLockedError(f"{self.what}: another writer took the lock {self.path} while this one broke it.")
        finally:
            tmp.unlink(missing_ok=True)

    def _break_stale(self) -> None:
        """Removes the stale lock, under a guard so two processes breaking it at once cannot remove a fresh one."""
        guard = self.path.with_name(f".{self.path.name}.guard")
        with open(guard, "a") as g:
            fcntl.flock(g, fcntl.LOCK_EX)
            try:
                self.check(break_stale=True)  # still stale under the guard (not replaced by a live writer's lock)
                self.path.unlink(missing_ok=True)
            finally:
                fcntl.flock(g, fcntl.LOCK_UN)

    def release(self) -> None:
        """Removes the lock if it is still ours (a lock broken by another process is left alone)."""
        if self.holder is None:
            return
        try:
            current = read_holder(self.path)
        except ValueError:
            current = None
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)
        self.holder = None


class ObjectLock(FileLock):
    """:class:`FileLock` on object storage: created by a conditional PUT (see the module docstring)."""

    def acquire(self, *, break_stale: bool = False) -> LockHolder:
        me = _me(self.purpose)
        body = (json.dumps(dataclasses.asdict(me), indent=2) + "\n").encode()
        fs, key = self.path.fs, self.path.path
        for _ in range(2):
            try:
                fs.pipe_file(key, body, mode="create")  # fails with FileExistsError if the lock object exists
            except FileExistsError:
                self.check(break_stale=break_stale)  # raises unless it is stale and may be broken
                self._break_stale()
                continue
            if not conditional_put_supported(fs):
                logger.warning(
                    "%s: %s cannot create objects conditionally, so the writer lock %s is best effort (two writers "
                    "starting at the same moment could both get it). Run one writer per store.",
                    self.what,
                    type(fs).__name__,
                    self.path,
                )
            self.holder = me
            return me
        raise StoreLockedError(f"{self.what}: another writer took the lock {self.path} while this one broke it.")

    def _raw(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def _break_stale(self) -> None:
        judged = self._raw()
        if judged is None:
            return  # gone already: the acquire loop retries the conditional create
        self.check(break_stale=True)  # raises unless the lock (as now) is stale
        if self._raw() != judged:
            return  # replaced meanwhile: the acquire loop finds the new lock
        record = self.path.with_name(f".{self.path.name}.takeover-{zlib.crc32(judged):08x}")
        me = _me(f"takeover of {self.path.name}")
        try:
            self.path.fs.pipe_file(record.path, json.dumps(dataclasses.asdict(me)).encode(), mode="create")
        except FileExistsError:
            try:
                taker = read_holder(record)
            except ValueError:
                taker = None
            raise StoreLockedError(
                f"{self.what}: another process ({taker.describe() if taker else 'unknown'}) is taking over the stale "
                f"writer lock {self.path} at the same time (takeover record {record}); only one may. If that "
                f"process is gone too, delete {record} and retry."
            ) from None
        try:
            if self._raw() == judged:  # still the lock we judged stale: no other breaker got here first
                self.path.unlink(missing_ok=True)
        finally:
            record.unlink(missing_ok=True)


def conditional_put_supported(fs) -> bool:
    """Whether ``fs.pipe_file(..., mode="create")`` is an atomic conditional create on the server (s3fs, gcsfs
    with a ``_pipe_file`` of its own that takes ``mode``), not fsspec's check-then-write fallback."""
    import inspect

    pipe = getattr(type(fs), "_pipe_file", None)
    if pipe is None or getattr(pipe, "__module__", "").startswith("fsspec."):
        return False
    try:
        return "mode" in inspect.signature(pipe).parameters
    except (TypeError, ValueError):
        return False


def make_lock(path: location.StorePath, *, purpose: str = "writer", what: str = "store") -> FileLock:
    """The lock for ``path``: a :class:`FileLock` on a local disk, an :class:`ObjectLock` on object storage."""
    cls = ObjectLock if location.is_remote(path) else FileLock
    return cls(path, purpose=purpose, what=what)
