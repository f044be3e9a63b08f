"""The checks that need no image decoding, shared by the dedup index and the shard processor.

Dedup runs among samples that pass these checks; image checks depend only on the image bytes,
which every copy of a duplicate shares, so they never change which copy is kept.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

from pipeline.data.captions import CaptionFilter, clean_caption
from pipeline.data.drops import Drop
from pipeline.data.tar_reader import RawSample, open_shard, read_samples, scan_layout
from pipeline.io.storage import Location
from pipeline.spec.prep import FilterSpec


@dataclass
class ScreenedSample:
    raw: RawSample
    caption: str | None
    """The clean caption when the sample passed; None when it was dropped."""
    drop: Drop | None
    """Why it was dropped; None when it passed."""


@dataclass
class ShardReadInfo:
    truncated: bool = False
    unordered: bool = False


def screen_shard(
    source: Location, filters: FilterSpec, info: ShardReadInfo
) -> Iterator[ScreenedSample]:
    """Read a shard and run the structural and caption checks on every sample."""
    caption_filter = CaptionFilter(filters)
    with open_shard(source) as (handle, size):
        layout = scan_layout(handle, size)
        info.truncated, info.unordered = layout.truncated, layout.unordered
        for raw in read_samples(handle, layout, filters):
            if raw.drop is not None:
                yield ScreenedSample(raw, None, raw.drop)
                continue
            caption = clean_caption(raw.caption_text())
            drop = caption_filter.check(caption)
            yield ScreenedSample(raw, None if drop else caption, drop)


def content_hash(image: bytes, caption: str, mode: str) -> str:
    """Hex digest identifying a duplicate under the dedup mode (``image`` or ``image_caption``)."""
    digest = hashlib.blake2b(image, digest_size=16)
    if mode == "image_caption":
        digest.update(b"\0" + caption.encode("utf-8"))
    return digest.hexdigest()
