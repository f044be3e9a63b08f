"""One way to reach local and ``s3://`` locations: fsspec filesystems built from the spec.

Workers on other nodes rebuild the same filesystem from a ``Location`` (URL + storage options),
so nothing depends on the driver's disk when the data lives on shared storage. Storage that
cannot be reached or refuses access raises :class:`StorageError`, a one-line error.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Iterator

import fsspec
from braceexpand import braceexpand

from pipeline.errors import UsageError
from pipeline.io.redact import redact_text, redact_url
from pipeline.spec.storage import StorageSpec

_GLOB_CHARS = set("*?[")
TMP_MARK = ".tmp-"
"""What :func:`atomic_write` puts in the name of a file it has not finished."""


class StorageError(UsageError):
    """Storage cannot be reached or refuses access: no or rejected credentials, an unreachable
    endpoint, a missing bucket, denied permissions."""

    permanent = False  # an endpoint that was unreachable for a while may answer a restarted worker


def storage_error(err: BaseException, url: str) -> StorageError | None:
    """The one-line :class:`StorageError` for ``err`` met on ``url``, or None if ``err`` is not
    an access problem (a missing file, a bug)."""
    where = redact_url(url)
    if isinstance(err, PermissionError):
        return StorageError(f"{where}: access denied: {redact_text(str(err))}")
    try:  # only s3fs raises botocore's errors; local storage needs no botocore (a GPU machine, docs/gpu.md)
        from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:
        return None
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"{where}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "a profile (storage.profile) or an instance role, or storage.anon: true for a public bucket"
        )
    if isinstance(err, BotoConnectionError):
        return StorageError(f"{where}: cannot reach the storage endpoint: {redact_text(str(err))}")
    if isinstance(err, FileNotFoundError) and isinstance(err.__cause__, ClientError):
        code = err.__cause__.response.get("Error", {}).get("Code")
        if code == "NoSuchBucket":
            return StorageError(f"{where}: the bucket does not exist")
    if isinstance(err, (BotoCoreError, ClientError)):
        return StorageError(f"{where}: storage error: {redact_text(str(err))}")
    return None


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Raise storage access problems met inside the block as :class:`StorageError`."""
    try:
        yield
    except Exception as err:
        translated = storage_error(err, url)
        if translated is None:
            raise
        raise translated from None


def storage_options(storage: StorageSpec | None, url: str) -> dict:
    """fsspec keyword arguments for ``url``; only ``s3://`` URLs take any."""
    if storage is None or not url.startswith("s3://"):
        return {}
    options: dict = {"anon": storage.anon}
    if storage.endpoint_url:
        options["endpoint_url"] = storage.endpoint_url
    if storage.region:
        options["client_kwargs"] = {"region_name": storage.region}
    if storage.profile:
        options["profile"] = storage.profile
    return options


@dataclass(frozen=True)
class Location:
    """A folder or file URL plus what is needed to open it from any node."""

    url: str
    options: dict = field(default_factory=dict)

    @classmethod
    def of(cls, url: str, storage: StorageSpec | None = None) -> "Location":
        """Build a location; local paths become absolute so workers agree on them."""
        if "://" not in url:
            url = os.path.abspath(os.path.expanduser(url))
        return cls(url.rstrip("/") if url != "/" else url, storage_options(storage, url))

    @property
    def is_local(self) -> bool:
        return "://" not in self.url or self.url.startswith("file://")

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem and the path inside it."""
        return fsspec.core.url_to_fs(self.url, **self.options)

    def child(self, *names: str) -> "Location":
        return Location(posixpath.join(self.url, *names), self.options)

    def pyarrow_filesystem(self):
        """A pyarrow filesystem over the same fsspec one (for Ray Data and pyarrow datasets)."""
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, _ = self.filesystem()
        return PyFileSystem(FSSpecHandler(fs))


def expand_inputs(patterns: list[str], storage: StorageSpec | None = None) -> list[Location]:
    """Expand brace patterns and globs, in the order given; each pattern's matches are sorted.

    ``http(s)://`` URLs are taken as they are (no listing; ``?`` starts their query string, as in
    presigned URLs).

    Raises:
        FileNotFoundError: a pattern matches nothing (a typo must not silently shrink a corpus).
        StorageError: the storage cannot be reached or refuses access.
    """
    shards: list[Location] = []
    for pattern in patterns:
        for expanded in braceexpand(pattern):
            base = Location.of(expanded, storage)
            with storage_errors(base.url):
                matches = _matches(base)
            if not matches:
                raise FileNotFoundError(f"input {redact_url(expanded)!r} matches no file")
            shards.extend(matches)
    return shards


def _matches(base: Location) -> list[Location]:
    fs, path = base.filesystem()
    protocol = _protocol_prefix(base.url)
    if not base.url.startswith(("http://", "https://")) and _GLOB_CHARS & set(path):
        return [Location(protocol + match, base.options) for match in sorted(fs.glob(path))]
    try:
        # info, not isfile: isfile answers False for a missing credential or endpoint as well.
        is_file = fs.info(path)["type"] == "file"
    except FileNotFoundError as err:
        if storage_error(err, base.url) is not None:
            raise
        return []
    return [base] if is_file else []


def _protocol_prefix(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url else ""


@contextmanager
def atomic_write(location: Location) -> Iterator[IO[bytes]]:
    """Write a file under a temporary name and move it into place only when complete.

    A reader never sees a partial file: a run killed mid-write leaves only a ``.tmp-`` file,
    which the next run ignores (and :func:`remove_partial_writes` deletes). On local disk the
    data is fsynced before the rename and the folder after it, so a file written after this
    one returns (a completion marker, say) never survives a power loss that this one does not.
    On S3 the move is a copy and a delete (``s3:DeleteObject``).
    """
    fs, path = location.filesystem()
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:12]}"
    if location.is_local:
        with _local_atomic_write(path, tmp) as handle:
            yield handle
        return
    try:
        with fs.open(tmp, "wb") as handle:
            yield handle
        with storage_errors(location.url):
            fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


@contextmanager
def _local_atomic_write(path: str, tmp: str) -> Iterator[IO[bytes]]:
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_folder(parent)


def fsync_folder(path: str) -> None:
    """Make the entries of a local folder (a rename into it, say) durable."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_bytes_atomic(location: Location, data: bytes) -> None:
    """Write ``data`` to ``location`` atomically."""
    with atomic_write(location) as handle:
        handle.write(data)


def read_bytes(location: Location) -> bytes:
    fs, path = location.filesystem()
    with storage_errors(location.url):
        return fs.cat_file(path)


def exists(location: Location) -> bool:
    fs, path = location.filesystem()
    with storage_errors(location.url):
        # info, not exists: exists answers False for a missing credential or endpoint as well.
        try:
            fs.info(path)
        except FileNotFoundError as err:
            if storage_error(err, location.url) is not None:
                raise
            return False
        except NotADirectoryError:
            return False  # a local path below a file (``shard.parquet/manifest.json``)
    return True


def remove_partial_writes(folder: Location) -> list[str]:
    """Delete every file under ``folder`` that :func:`atomic_write` left unfinished (a run
    killed mid-write); returns their paths. Call it only while no other writer is at work
    (under the folder's lease)."""
    fs, path = folder.filesystem()
    with storage_errors(folder.url):
        if not fs.exists(path):
            return []
        leftovers = [p for p in fs.find(path) if TMP_MARK in posixpath.basename(p)]
        for leftover in leftovers:
            fs.rm(leftover)
        fs.invalidate_cache(path)
    return leftovers
