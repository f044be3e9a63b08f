"""One way to reach local and ``s3://`` locations: fsspec filesystems built from the spec.

Workers on other nodes rebuild the same filesystem from a ``Location`` (URL + storage options),
so nothing depends on the driver's disk when the data lives on shared storage.
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

from pipeline.spec.storage import StorageSpec

_GLOB_CHARS = set("*?[")


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

    Raises:
        FileNotFoundError: a pattern matches nothing (a typo must not silently shrink a corpus).
    """
    shards: list[Location] = []
    for pattern in patterns:
        for expanded in braceexpand(pattern):
            base = Location.of(expanded, storage)
            fs, path = base.filesystem()
            protocol = _protocol_prefix(base.url)
            if _GLOB_CHARS & set(path):
                matches = sorted(fs.glob(path))
            else:
                matches = [path] if fs.isfile(path) else []
            if not matches:
                raise FileNotFoundError(f"input {expanded!r} matches no file")
            shards.extend(Location(protocol + match, base.options) for match in matches)
    return shards


def _protocol_prefix(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url else ""


@contextmanager
def atomic_write(location: Location) -> Iterator[IO[bytes]]:
    """Write a file under a temporary name and move it into place only when complete.

    A reader never sees a partial file: a run killed mid-write leaves only a ``.tmp-`` file,
    which the next run ignores and overwrites under a new name.
    """
    fs, path = location.filesystem()
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    parent = posixpath.dirname(path)
    if location.is_local:
        os.makedirs(parent, exist_ok=True)
    try:
        with fs.open(tmp, "wb") as handle:
            yield handle
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_bytes_atomic(location: Location, data: bytes) -> None:
    """Write ``data`` to ``location`` atomically."""
    with atomic_write(location) as handle:
        handle.write(data)


def read_bytes(location: Location) -> bytes:
    fs, path = location.filesystem()
    return fs.cat_file(path)


def exists(location: Location) -> bool:
    fs, path = location.filesystem()
    return fs.exists(path)
