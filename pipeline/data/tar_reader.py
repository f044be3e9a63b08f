"""Read WebDataset samples from one tar shard, robustly.

Members are grouped by key (the member path up to the first dot of its file name), over the
whole shard, so an unordered tar still yields whole samples (Ray's reader splits them, ray
#44068). Only member headers are held in memory; member bytes are read one sample at a time,
and only after their size in the tar header has passed the spec's limits. A truncated tar, the
same member twice, an oversized or unparseable member drops the affected sample with a counted
reason.

Compressed shards (gzip, bzip2, xz; recognised by their magic bytes, whatever their name) are
decompressed as a stream into a local temporary file, then read like a plain tar: grouping
members across the whole shard needs random access, which a compressed stream does not give
without either holding samples in memory or decompressing again for every out-of-order member.
A compressed stream that is cut or corrupt reads as a tar cut at that point.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import posixpath
import tarfile
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Iterator

from pipeline.data.drops import Drop
from pipeline.io.storage import Location
from pipeline.spec.prep import FilterSpec

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class RawSample:
    """One sample as read from the tar, or the reason it cannot be used."""

    key: str
    order: int
    """Position of the sample in the shard (first member seen)."""
    image: bytes | None = None
    image_ext: str | None = None
    caption_bytes: bytes | None = None
    metadata: dict = field(default_factory=dict)
    drop: Drop | None = None

    def caption_text(self) -> str | None:
        """The caption decoded as UTF-8, or None if it is not valid UTF-8."""
        try:
            return self.caption_bytes.decode("utf-8") if self.caption_bytes is not None else None
        except UnicodeDecodeError:
            return None


@dataclass
class ShardLayout:
    """Where each sample's members sit in the tar."""

    groups: dict[str, dict[str, tarfile.TarInfo]]
    """key -> extension -> member header, in the order keys first appear."""
    duplicated: set[str]
    """Keys with a member name that appears twice."""
    truncated_key: str | None
    """Key whose members the tar ends inside, if the tar is truncated."""
    truncated: bool
    unordered: bool
    """Some sample's members are not consecutive."""


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/0001.seg.jpg`` -> (``dir/0001``, ``seg.jpg``), WebDataset's convention."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(directory, stem), ext.lower() if dot else ""


def scan_layout(handle: IO[bytes], file_size: int) -> ShardLayout:
    """Read the member headers of a seekable tar without reading member data.

    Raises:
        tarfile.ReadError: the file is not a tar at all (nothing could be read from it).
    """
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    duplicated: set[str] = set()
    closed: set[str] = set()
    unordered = truncated = False
    last_key = None
    archive = tarfile.open(fileobj=handle, mode="r:")
    members_iter = iter(archive)
    while True:
        try:
            member = next(members_iter)
        except StopIteration:
            # tarfile ends iteration quietly at a cut or garbled header; only a proper
            # end-of-archive marker (two zero blocks) tells a complete tar from a cut one.
            truncated = not _has_end_marker(handle, archive.offset)
            break
        except tarfile.ReadError:
            if not groups:
                raise
            truncated = True
            break
        if not member.isfile():
            continue
        key, ext = split_member_name(member.name)
        if member.offset_data + member.size > file_size:
            truncated, last_key = True, key
            break
        if key != last_key:
            if last_key is not None:
                closed.add(last_key)
            unordered |= key in closed
            last_key = key
        members = groups.setdefault(key, {})
        if ext in members:
            duplicated.add(key)
        members[ext] = member
    return ShardLayout(groups, duplicated, last_key if truncated else None, truncated, unordered)


def _has_end_marker(handle: IO[bytes], offset: int) -> bool:
    handle.seek(offset)
    return handle.read(2 * tarfile.BLOCKSIZE) == bytes(2 * tarfile.BLOCKSIZE)


def read_samples(handle: IO[bytes], layout: ShardLayout, limits: FilterSpec) -> Iterator[RawSample]:
    """Yield every sample of the shard in order, with its drop reason if it is unusable.

    ``limits`` gives the largest image, caption and metadata member read (``max_*_bytes``).
    """
    for order, (key, members) in enumerate(layout.groups.items()):
        sample = RawSample(key=key, order=order)
        if key == layout.truncated_key:
            sample.drop = Drop.TRUNCATED_TAR
        elif key in layout.duplicated:
            sample.drop = Drop.DUPLICATE_MEMBER
        else:
            _fill(sample, handle, members, limits)
        yield sample
    if layout.truncated_key is not None and layout.truncated_key not in layout.groups:
        yield RawSample(key=layout.truncated_key, order=len(layout.groups), drop=Drop.TRUNCATED_TAR)


def _fill(
    sample: RawSample, handle: IO[bytes], members: dict[str, tarfile.TarInfo], limits: FilterSpec
) -> None:
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_ext is None:
        sample.drop = Drop.MISSING_IMAGE
        return
    if "txt" not in members:
        sample.drop = Drop.MISSING_CAPTION
        return
    sample.drop = _oversized(members, image_ext, limits)
    if sample.drop is not None:
        return
    sample.image_ext = image_ext
    sample.image = _read_member(handle, members[image_ext])
    sample.caption_bytes = _read_member(handle, members["txt"])
    if sample.image is None or sample.caption_bytes is None:
        sample.drop = Drop.TRUNCATED_TAR
        return
    if sample.caption_text() is None:
        sample.drop = Drop.CAPTION_NOT_UTF8
        return
    if "json" in members:
        metadata = _parse_metadata(_read_member(handle, members["json"]))
        if metadata is None:
            sample.drop = Drop.METADATA_INVALID
            return
        sample.metadata = metadata


def _oversized(members: dict[str, tarfile.TarInfo], image_ext: str, limits: FilterSpec) -> Drop | None:
    if members[image_ext].size > limits.max_image_bytes:
        return Drop.IMAGE_FILE_TOO_LARGE
    if members["txt"].size > limits.max_caption_bytes:
        return Drop.CAPTION_FILE_TOO_LARGE
    if "json" in members and members["json"].size > limits.max_metadata_bytes:
        return Drop.METADATA_FILE_TOO_LARGE
    return None


def _read_member(handle: IO[bytes], member: tarfile.TarInfo) -> bytes | None:
    handle.seek(member.offset_data)
    data = handle.read(member.size)
    return data if len(data) == member.size else None


def _parse_metadata(data: bytes | None) -> dict | None:
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):  # not JSON or not UTF-8; too deep; a huge integer
        return None
    return value if isinstance(value, dict) else None


_DECOMPRESSORS = (
    (b"\x1f\x8b", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)
_SPOOL_CHUNK = 2**20


@contextmanager
def open_shard(source: Location) -> Iterator[tuple[IO[bytes], int]]:
    """A seekable handle on the shard's tar bytes, and their size.

    A compressed shard is decompressed into a temporary local file first (see the module
    docstring); storage errors while reading it propagate, they are not taken for a cut file.
    """
    fs, path = source.filesystem()
    with fs.open(path, "rb") as handle:
        magic = handle.read(6)
        handle.seek(0)
        opener = next((opener for prefix, opener in _DECOMPRESSORS if magic.startswith(prefix)), None)
        if opener is None:
            yield handle, fs.size(path)
            return
        with tempfile.TemporaryFile(prefix="qformer-shard-") as spool:
            _decompress(opener(_SourceReads(handle)), spool)
            size = spool.tell()
            spool.seek(0)
            yield spool, size


class _SourceFailed(Exception):
    """A read of the compressed source failed (told apart from the data being corrupt)."""


class _SourceReads:
    """The compressed source as the decompressors read it."""

    def __init__(self, handle: IO[bytes]):
        self.handle = handle

    def read(self, size: int = -1) -> bytes:
        try:
            return self.handle.read(size)
        except Exception as err:
            raise _SourceFailed() from err


def _decompress(stream: IO[bytes], spool: IO[bytes]) -> None:
    while True:
        try:
            chunk = stream.read1(_SPOOL_CHUNK)  # read would lose the data before a cut
        except _SourceFailed as failed:
            raise failed.__cause__ from None
        except (EOFError, OSError, zlib.error, lzma.LZMAError):
            return  # cut or corrupt from here on: what came before is read as a cut tar
        if not chunk:
            return
        spool.write(chunk)  # outside the try: a full disk is an error, not a cut shard
