"""A lease on a folder: one run at a time writes into it.

The holder keeps ``FOLDER/_lease.json`` (owner, host, pid, purpose, start and heartbeat times)
and refreshes its heartbeat from a background thread; a second run refuses to start and names
the holder. A lease is taken over (and the taker says so) when its heartbeat is older than
``stale_after_s``, or at once when its holder ran on this host and its process is gone.

Every change is a compare-and-swap, so two runs racing for a free or stale lease cannot both
win:

- on S3, conditional writes: ``PutObject`` with ``If-None-Match: *`` to create, ``If-Match:
  ETAG`` to refresh or take over (AWS S3 since 2024, MinIO, moto 5), and a conditional
  ``DeleteObject`` to release. On a store that answers "not implemented" the lease falls back to
  writing and reading back its own record: best effort, as two runs starting within the same
  moment can then both believe they hold it.
- on a local (or NFS) folder, read-compare-write under ``fcntl.flock`` of ``_lease.lock``,
  with the record written atomically and fsynced.

A holder whose lease was taken over (it stalled for longer than ``stale_after_s``) learns it at
its next heartbeat; :meth:`Lease.check` then raises :class:`LeaseLost`. Clocks of the hosts
sharing a folder are assumed to agree to well within ``stale_after_s`` (NTP).
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator

import psutil

from pipeline.errors import QformerError, UsageError
from pipeline.io.storage import Location, fsync_folder, storage_errors

log = logging.getLogger("qformer.lease")

LEASE_FILE = "_lease.json"
LOCK_FILE = "_lease.lock"


class LeaseHeld(UsageError):
    """Another live run holds the folder's lease."""


class LeaseLost(QformerError):
    """This run's lease was taken over by another run (this one stalled past the stale time)."""


@dataclass
class Lease:
    """A held lease; its heartbeat thread refreshes it until :func:`hold_lease` exits."""

    folder: Location
    record: dict
    lost_to: str | None = None
    """Who took the lease over, once the heartbeat found out."""

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another run has taken the lease over."""
        if self.lost_to is not None:
            raise LeaseLost(
                f"{self.folder.url}: this run's lease was taken over by {self.lost_to} (no heartbeat "
                f"for {self.record['stale_after_s']:g} s); stopping so that one run writes the folder"
            )


@contextmanager
def hold_lease(folder: Location, *, purpose: str, stale_after_s: float = 300.0) -> Iterator[Lease]:
    """Hold ``folder``'s lease for the duration of the block.

    Args:
        folder: the folder (local or ``s3://``) one run at a time may write.
        purpose: what the holder does, for the message a refused run prints (``qformer prep``).
        stale_after_s: a lease whose heartbeat is older than this is taken over; the holder
            refreshes it every quarter of this.

    Raises:
        LeaseHeld: a live run holds it (exit status 2).
        StorageError: the folder cannot be reached.

    Example::

        with hold_lease(Location.of("runs/demo"), purpose="qformer train") as lease:
            ...
            lease.check()  # before a step that must not run twice: raises LeaseLost
    """
    store = _store_for(folder)
    with storage_errors(folder.url):
        lease = _acquire(store, folder, purpose, stale_after_s)
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(store, lease, stop), name="lease-heartbeat", daemon=True
    )
    beat.start()
    try:
        yield lease
    finally:
        stop.set()
        beat.join()
        if lease.lost_to is None:
            _release(store, lease)


@dataclass(frozen=True)
class LeaseState:
    """A folder's lease as another process sees it (``qformer status``)."""

    record: dict
    """The lease file: owner, host, pid, purpose, start and heartbeat times."""
    stale_reason: str | None
    """Why the lease may be taken over (its holder is gone or silent); None: it is held."""

    @property
    def held(self) -> bool:
        return self.stale_reason is None

    @property
    def heartbeat_age_s(self) -> float | None:
        try:
            return time.time() - float(self.record["heartbeat"])
        except (KeyError, TypeError, ValueError):
            return None


def read_lease(folder: Location) -> LeaseState | None:
    """The lease of ``folder`` as it stands, without touching it; None when no lease file is
    there (no run holds the folder).

    Raises:
        StorageError: the folder cannot be reached.
    """
    store = _store_for(folder)
    with storage_errors(folder.url):
        current = store.read()
    if current is None:
        return None
    record = current[0]
    try:
        stale_after_s = float(record.get("stale_after_s", 300.0))
    except (TypeError, ValueError):
        stale_after_s = 300.0
    return LeaseState(record, _stale_reason(record, stale_after_s))


def _new_record(purpose: str, stale_after_s: float) -> dict:
    now = time.time()
    pid = os.getpid()
    return {
        "owner": f"{_user()}@{socket.gethostname()} pid {pid}",
        "purpose": purpose,
        "host": socket.gethostname(),
        "pid": pid,
        "pid_started": psutil.Process(pid).create_time(),
        "started": now,
        "started_utc": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
        "heartbeat": now,
        "stale_after_s": stale_after_s,
        "token": uuid.uuid4().hex,
    }


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return f"uid{os.getuid()}"


def _acquire(store, folder: Location, purpose: str, stale_after_s: float) -> Lease:
    record = _new_record(purpose, stale_after_s)
    while True:
        current = store.read()
        if current is None:
            store.version = store.create(_encode(record))
            if store.version is not None:
                return Lease(folder, record)
            continue  # another run created it in between: look at it
        held, version = current
        reason = _stale_reason(held, stale_after_s)
        if reason is None:
            raise LeaseHeld(_held_message(folder, held, stale_after_s))
        store.version = store.replace(_encode(record), version)
        if store.version is not None:
            log.warning("%s: taking over the lease of %s (%s): %s", folder.url,
                        held.get("owner", "an unknown run"), held.get("purpose", "?"), reason)
            return Lease(folder, record)


def _stale_reason(record: dict, stale_after_s: float) -> str | None:
    """Why the lease ``record`` may be taken over, or None while its holder is alive."""
    try:
        age = time.time() - float(record["heartbeat"])
        host, pid, pid_started = record["host"], int(record["pid"]), float(record["pid_started"])
    except (KeyError, TypeError, ValueError):
        return "its lease file is unreadable"
    if host == socket.gethostname() and not _process_alive(pid, pid_started):
        return f"its process {pid} on this host is gone"
    if age > stale_after_s:
        return f"its last heartbeat is {age:.0f} s old (stale after {stale_after_s:g} s)"
    return None


def _process_alive(pid: int, started: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0  # not a reused pid
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def _held_message(folder: Location, record: dict, stale_after_s: float) -> str:
    age = time.time() - float(record["heartbeat"])
    return (
        f"{folder.url} is in use by {record.get('purpose', 'another run')} of "
        f"{record.get('owner', 'an unknown owner')} "
        f"(started {record.get('started_utc', '?')}, last heartbeat {age:.0f} s ago); one run at a "
        f"time writes a folder: wait for it, stop it, or, if it is dead on another host, re-run "
        f"once its heartbeat is {stale_after_s:g} s old"
    )


def _heartbeat(store, lease: Lease, stop: threading.Event) -> None:
    interval = max(0.05, lease.record["stale_after_s"] / 4)
    while not stop.wait(interval):
        record = {**lease.record, "heartbeat": time.time()}
        try:
            version = store.replace(_encode(record), store.version)
            if version is None:
                current = store.read()
                lease.lost_to = current[0].get("owner", "another run") if current else "nobody"
                log.error("%s: lease lost to %s", lease.folder.url, lease.lost_to)
                return
            store.version = version
            lease.record = record
        except Exception as err:  # a storage hiccup: the next beat tries again
            log.warning("%s: lease heartbeat failed (%s); retrying", lease.folder.url, err)


def _release(store, lease: Lease) -> None:
    try:
        store.delete(store.version)
    except Exception as err:  # the lease goes stale and is taken over later
        log.warning("%s: could not release the lease (%s)", lease.folder.url, err)


def _encode(record: dict) -> bytes:
    return json.dumps(record, indent=1).encode()


def _decode(data: bytes) -> dict:
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _store_for(folder: Location):
    if folder.is_local:
        return _LocalStore(folder)
    if folder.url.startswith("s3://"):
        return _S3Store(folder)
    raise UsageError(f"{folder.url}: a lease needs a local folder or an s3:// location")


class _LocalStore:
    """Compare-and-swap on a local file, under an exclusive ``flock``. Versions are the bytes."""

    def __init__(self, folder: Location):
        _, root = folder.filesystem()
        self.root = root
        self.path = os.path.join(root, LEASE_FILE)
        self.version: bytes | None = None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, LOCK_FILE), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _current(self) -> bytes | None:
        try:
            with open(self.path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def _write(self, data: bytes) -> bytes:
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.new"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        fsync_folder(self.root)
        return data

    def read(self) -> tuple[dict, bytes] | None:
        with self._locked():
            data = self._current()
        return None if data is None else (_decode(data), data)

    def create(self, data: bytes) -> bytes | None:
        with self._locked():
            return None if self._current() is not None else self._write(data)

    def replace(self, data: bytes, version: bytes) -> bytes | None:
        with self._locked():
            return self._write(data) if self._current() == version else None

    def delete(self, version: bytes) -> None:
        with self._locked():
            if self._current() == version:
                os.remove(self.path)


class _S3Store:
    """Compare-and-swap on an S3 object with conditional requests. Versions are ETags."""

    def __init__(self, folder: Location, conditional: bool = True):
        self.fs, root = folder.filesystem()
        self.bucket, self.key, _ = self.fs.split_path(posixpath.join(root, LEASE_FILE))
        self.conditional = conditional
        """False once the store has answered that it does not implement conditional writes."""
        self.version: str | None = None

    def read(self) -> tuple[dict, str] | None:
        from fsspec.asyn import sync

        async def get():  # one GET for the body and its ETag (cat_file gives no ETag)
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await response["Body"].read(), response["ETag"]
            finally:
                response["Body"].close()

        try:
            data, etag = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        return _decode(data), etag

    def _put(self, data: bytes, **condition) -> str | None:
        """The new ETag, or None when the condition does not hold."""
        if not self.conditional:
            condition = {}
        try:
            response = self.fs.call_s3(
                "put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition
            )
        except FileExistsError:  # If-None-Match failed
            return None
        except OSError as err:
            code = _s3_code(err)
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            if code == "NotImplemented" and condition:
                log.warning(
                    "s3://%s: the store does not implement conditional writes; the lease is "
                    "best effort (write, then read back)", self.bucket,
                )
                self.conditional = False
                return self._put(data)
            raise
        return response["ETag"]

    def _confirmed(self, data: bytes, etag: str | None) -> str | None:
        """Without conditional writes, a write counts only if it reads back as ours."""
        if etag is None or self.conditional:
            return etag
        current = self.read()
        return current[1] if current is not None and current[0] == _decode(data) else None

    def create(self, data: bytes) -> str | None:
        if not self.conditional and self.read() is not None:
            return None
        return self._confirmed(data, self._put(data, IfNoneMatch="*"))

    def replace(self, data: bytes, version: str) -> str | None:
        if not self.conditional:
            current = self.read()
            if current is None or current[1] != version:
                return None
        return self._confirmed(data, self._put(data, IfMatch=version))

    def delete(self, version: str) -> None:
        if self.conditional:
            try:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
                return
            except OSError as err:
                if _s3_code(err) in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return  # someone else's lease by now
                if _s3_code(err) != "NotImplemented":
                    raise
        current = self.read()
        if current is not None and current[1] == version:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)


def _s3_code(err: BaseException) -> str | None:
    """The S3 error code behind an s3fs ``OSError`` (s3fs keeps the botocore error as cause)."""
    response = getattr(err.__cause__, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None
