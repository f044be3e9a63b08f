"""Read WebDataset samples from one tar shard, robustly.

Members are grouped by key (the member path up to the first dot of its file name), over the
whole shard, so an unordered tar still yields whole samples (Ray's reader splits them, ray
#44068). Only member headers are held in memory; member bytes are read one sample at a time.
A truncated tar, or the same member twice, drops the affected sample with a counted reason.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import IO, Iterator

from pipeline.data.drops import Drop

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


def read_samples(handle: IO[bytes], layout: ShardLayout) -> Iterator[RawSample]:
    """Yield every sample of the shard in order, with its drop reason if it is unusable."""
    for order, (key, members) in enumerate(layout.groups.items()):
        sample = RawSample(key=key, order=order)
        if key == layout.truncated_key:
            sample.drop = Drop.TRUNCATED_TAR
        elif key in layout.duplicated:
            sample.drop = Drop.DUPLICATE_MEMBER
        else:
            _fill(sample, handle, members)
        yield sample
    if layout.truncated_key is not None and layout.truncated_key not in layout.groups:
        yield RawSample(key=layout.truncated_key, order=len(layout.groups), drop=Drop.TRUNCATED_TAR)


def _fill(sample: RawSample, handle: IO[bytes], members: dict[str, tarfile.TarInfo]) -> None:
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
    if image_ext is None:
        sample.drop = Drop.MISSING_IMAGE
        return
    if "txt" not in members:
        sample.drop = Drop.MISSING_CAPTION
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


def _read_member(handle: IO[bytes], member: tarfile.TarInfo) -> bytes | None:
    handle.seek(member.offset_data)
    data = handle.read(member.size)
    return data if len(data) == member.size else None


def _parse_metadata(data: bytes | None) -> dict | None:
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
