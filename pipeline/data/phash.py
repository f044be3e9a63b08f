"""Perceptual image hashes, and the near-duplicate pairs among many of them (banded LSH).

Two algorithms (``NearDupSpec.algorithm``), both over the low-frequency 8x8 block of the 2-D DCT
of a 32x32 thumbnail:

- ``phash``: the classic pHash (as the ``imagehash`` package computes it): greyscale, LANCZOS
  thumbnail, each of the 64 coefficients against their median. On images with large flat areas
  most coefficients sit near that median and their bits are coin flips.
- ``dct_simhash``: colour (an area-averaged RGB thumbnail, its mean level removed), the three
  channels' blocks as one vector, and the signs of ``bits`` fixed random +-1 projections of it
  (SimHash): the expected fraction of differing bits is the angle between two images' vectors
  over pi, so the Hamming distance measures how alike two blurred colour thumbnails look.

Near-duplicate search: the hash bits are cut into ``bands`` contiguous bands; only hashes that
agree on a whole band are compared. Two hashes within ``threshold`` bits agree on at least one of
``threshold + 1`` bands (pigeonhole), so that many bands find every pair.
"""

from __future__ import annotations

import hashlib
import io
from functools import lru_cache

import numpy as np
from PIL import Image

from pipeline.data.images import to_rgb
from pipeline.spec.prep import NearDupSpec

_SIDE = 32
"""Side of the thumbnail the DCT is taken of."""
_LOW = 8
"""Side of the low-frequency block kept."""


@lru_cache(maxsize=None)
def _dct_matrix(n: int) -> np.ndarray:
    """(n, n) orthonormal DCT-II matrix: ``D @ x`` is the DCT of a column vector ``x``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    matrix[0] /= np.sqrt(2)
    return matrix


@lru_cache(maxsize=None)
def _projections(bits: int, dims: int) -> np.ndarray:
    """(bits, dims) fixed +-1 matrix from blake2b (the same on every machine and version)."""
    needed = bits * dims
    stream = b"".join(
        hashlib.blake2b(f"qformer-dct-simhash/{block}".encode(), digest_size=64).digest()
        for block in range(-(-needed // 512))
    )
    signs = np.unpackbits(np.frombuffer(stream, np.uint8))[:needed].reshape(bits, dims)
    return signs.astype(np.float64) * 2 - 1


def _low_block(channel: np.ndarray) -> np.ndarray:
    """(32, 32) channel -> its (8, 8) lowest DCT frequencies, flattened to (64,)."""
    dct = _dct_matrix(_SIDE)
    return (dct @ channel @ dct.T)[:_LOW, :_LOW].ravel()


def decode_for_hash(image: Image.Image) -> Image.Image:
    """An opened, not yet decoded image, decoded as the hashes see it: RGB, transparent parts on
    white, a JPEG at the smallest DCT scale that keeps the thumbnail's detail. Raises whatever
    the decoder raises."""
    if image.format == "JPEG":
        image.draft("RGB", (2 * _SIDE, 2 * _SIDE))  # decode at reduced DCT scale
    return to_rgb(image)


class ImageHasher:
    """Hashes images as ``NearDupSpec`` says; a hash is ``bits // 8`` bytes.

    Args:
        spec: The algorithm and hash length (and whether flipped copies count).
        formats: Pillow formats an encoded image may be in (others are not parsed).
    """

    def __init__(self, spec: NearDupSpec, formats: tuple[str, ...] | None = None):
        self.spec, self.formats = spec, formats

    def hash_image(self, image: Image.Image) -> bytes:
        """The hash of a decoded image (transparent parts count as white, as prep's output has
        them: a JPEG copy of a transparent PNG must hash like it)."""
        image = to_rgb(image)
        if self.spec.algorithm == "phash":
            grey = np.asarray(image.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS), np.float64)
            block = _low_block(grey)  # (64,)
            return np.packbits(block > np.median(block)).tobytes()
        rgb = np.asarray(image.resize((_SIDE, _SIDE), Image.Resampling.BOX), np.float64)
        rgb = rgb / 255.0 - rgb.mean() / 255.0  # (32, 32, 3): the layout and colours, not the brightness
        features = np.concatenate([_low_block(rgb[:, :, c]) for c in range(3)])  # (192,)
        return np.packbits(_projections(self.spec.bits, features.size) @ features > 0).tobytes()

    def hash_pair(self, image: Image.Image) -> tuple[bytes, bytes | None]:
        """The image's hash and, when flips count, its mirror image's (else None)."""
        flipped = self.hash_image(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) if self.spec.flips else None
        return self.hash_image(image), flipped

    def hash_opened(self, image: Image.Image) -> tuple[bytes, bytes | None] | None:
        """``hash_pair`` of an opened, not yet decoded image, or None when it cannot be decoded."""
        try:
            return self.hash_pair(decode_for_hash(image))
        except Exception:  # whatever a decoder raises on a broken file: no hash
            return None

    def hash_encoded(self, data: bytes) -> tuple[bytes, bytes | None] | None:
        """``hash_pair`` of an encoded image, or None when it cannot be decoded."""
        try:
            image = Image.open(io.BytesIO(data), formats=self.formats)
        except Exception:
            return None
        with image:
            return self.hash_opened(image)


def as_words(hashes: list[bytes]) -> np.ndarray:
    """Equal-length hashes -> (N, bits // 64) uint64 words."""
    if not hashes:
        return np.zeros((0, 1), np.uint64)
    return np.frombuffer(b"".join(hashes), dtype=">u8").astype(np.uint64).reshape(len(hashes), -1)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise distances of (..., W) uint64 words: (...,) int."""
    return np.bitwise_count(a ^ b).sum(axis=-1)


NONE = np.iinfo(np.int64).max
"""The order of "no near duplicate"."""
_CHUNK = 512


def band_keys(entries: np.ndarray, bands: int) -> list[np.ndarray]:
    """Each band's bits of (E, W) hash words: ``bands`` arrays of (E, ceil(band bits / 8)) uint8."""
    bits = np.unpackbits(entries.astype(">u8").view(np.uint8).reshape(len(entries), -1), axis=1)  # (E, bits)
    edges = np.linspace(0, bits.shape[1], bands + 1).round().astype(int)
    return [np.packbits(bits[:, start:stop], axis=1) for start, stop in zip(edges[:-1], edges[1:])]


def groups_of(labels: np.ndarray) -> list[np.ndarray]:
    """Indexes of each group of two or more equal labels ((E,) integers)."""
    by_label = np.argsort(labels, kind="stable")
    starts = np.flatnonzero(np.diff(labels[by_label], prepend=labels.min() - 1 if len(labels) else 0))
    sizes = np.diff(np.append(starts, len(labels)))
    return [by_label[s : s + n] for s, n in zip(starts, sizes) if n > 1]


class EarliestNear:
    """Per hash entry, the earliest (by corpus order) earlier entry within ``threshold`` bits among
    the groups of entries compared so far; memory stays linear in the entries, whatever the pairs.

    Args:
        order: (E,) corpus order of each entry's image (an image's mirror-image hash shares it).
        entries: (E, W) uint64 hash words.
        threshold: Most differing bits of near duplicates.
    """

    def __init__(self, order: np.ndarray, entries: np.ndarray, threshold: int):
        self.order, self.entries, self.threshold = order, entries, threshold
        self.best_order = np.full(len(order), NONE, np.int64)  # (E,)
        self.best_entry = np.full(len(order), -1, np.int64)  # (E,)

    def compare(self, members: np.ndarray) -> None:
        """Compare every pair of the entries ``members`` (in blocks: a huge group of equal hashes
        stays in memory)."""
        for low in range(0, len(members), _CHUNK):
            mine = members[low : low + _CHUNK]
            for other_low in range(0, len(members), _CHUNK):
                other = members[other_low : other_low + _CHUNK]
                distance = hamming(self.entries[mine][:, None, :], self.entries[other][None, :, :])  # (C, O)
                other_order = self.order[other]  # (O,)
                near = (distance <= self.threshold) & (other_order[None, :] < self.order[mine][:, None])
                candidate_order = np.where(near, other_order[None, :], NONE)  # (C, O)
                pick = candidate_order.argmin(axis=1)  # (C,)
                found = candidate_order[np.arange(len(mine)), pick]  # (C,)
                better = found < self.best_order[mine]
                self.best_order[mine[better]] = found[better]
                self.best_entry[mine[better]] = other[pick[better]]


def earliest_near(order: np.ndarray, hashes: np.ndarray, flipped: np.ndarray | None,
                  threshold: int, bands: int) -> np.ndarray:
    """For each row, its earliest (by corpus order) near duplicate among the rows before it.

    Only rows that agree on at least one band are compared; with ``flipped``, a row's
    mirror-image hash counts as its own.

    Args:
        order: (N,) corpus order of each row (distinct).
        hashes: (N, W) uint64 hash words.
        flipped: (N, W) mirror-image hash words, or None.
        threshold: Most differing bits of near duplicates.
        bands: Bands the hash bits are cut into.

    Returns:
        (N,) int64: the row index of the earliest earlier near duplicate, or -1.
    """
    count = len(order)
    entries, owners = hashes, np.arange(count)  # (E, W), (E,)
    if flipped is not None:
        entries, owners = np.concatenate([hashes, flipped]), np.concatenate([owners, owners])
    search = EarliestNear(order[owners], entries, threshold)
    for keys in band_keys(entries, bands):
        _, labels = np.unique(keys, axis=0, return_inverse=True)
        for members in groups_of(labels.reshape(-1)):
            search.compare(members)
    best_order = np.full(count, NONE, np.int64)
    best_row = np.full(count, -1, np.int64)
    for entry in np.flatnonzero(search.best_order != NONE):
        row, found = owners[entry], search.best_order[entry]
        if found < best_order[row]:
            best_order[row], best_row[row] = found, owners[search.best_entry[entry]]
    return best_row
