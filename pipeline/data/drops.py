"""Why a sample was dropped (by ``qformer prep`` or ``qformer curate``). Every drop is counted
under one of these reasons."""

from __future__ import annotations

from collections import Counter
from enum import Enum


class Drop(str, Enum):
    """Drop reasons, in the order the checks run."""

    TRUNCATED_TAR = "truncated_tar"
    """The tar ends (or breaks) inside this sample's members."""
    DUPLICATE_MEMBER = "duplicate_member"
    """The same member name appears twice in one shard."""
    MISSING_IMAGE = "missing_image"
    """No .jpg/.jpeg/.png/.webp member."""
    MISSING_CAPTION = "missing_caption"
    """No .txt member."""
    IMAGE_FILE_TOO_LARGE = "image_file_too_large"
    """The image member is larger than ``filters.max_image_bytes`` (by its tar header; not read)."""
    CAPTION_FILE_TOO_LARGE = "caption_file_too_large"
    """The .txt member is larger than ``filters.max_caption_bytes`` (not read)."""
    METADATA_FILE_TOO_LARGE = "metadata_file_too_large"
    """The .json member is larger than ``filters.max_metadata_bytes`` (not read)."""
    CAPTION_NOT_UTF8 = "caption_not_utf8"
    METADATA_INVALID = "metadata_invalid"
    """The optional .json member is not a JSON object (or nests too deep, or holds a number
    too long to convert)."""
    CAPTION_TOO_SHORT = "caption_too_short"
    CAPTION_TOO_LONG = "caption_too_long"
    CAPTION_TOO_FEW_WORDS = "caption_too_few_words"
    CAPTION_TOO_MANY_WORDS = "caption_too_many_words"
    CAPTION_BLOCKLISTED = "caption_blocklisted"
    DUPLICATE = "duplicate"
    """Same content (image, or image + caption) as an earlier sample of the corpus."""
    NEAR_DUPLICATE = "near_duplicate"
    """An image within the perceptual-hash threshold of an earlier sample's (resized, re-encoded,
    slightly cropped, or flipped when flips count)."""
    IMAGE_EMPTY = "image_empty"
    IMAGE_FORMAT_NOT_ALLOWED = "image_format_not_allowed"
    """An image in a format outside ``filters.image_formats`` (identified by its magic bytes)."""
    IMAGE_CORRUPT = "image_corrupt"
    """Not decodable: no image at all, or an allowed format that fails to decode."""
    IMAGE_TOO_MANY_PIXELS = "image_too_many_pixels"
    IMAGE_TOO_SMALL = "image_too_small"
    IMAGE_ASPECT_RATIO = "image_aspect_ratio"
    SCORE_TOO_LOW = "score_too_low"
    """Curation: no caption of the image scores ``select.min_score``."""
    SCORE_NOT_IN_TOP_FRACTION = "score_not_in_top_fraction"
    """Curation: the image's best score is below the corpus's ``select.top_fraction`` cut."""


def merge_counts(*counts: dict[str, int]) -> dict[str, int]:
    """Sum drop counters, keeping only non-zero reasons, sorted by name."""
    total: Counter = Counter()
    for count in counts:
        total.update(count)
    return {reason: n for reason, n in sorted(total.items()) if n}
