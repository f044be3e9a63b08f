"""Synthetic photo-like JPEGs that the benchmarks decode: smooth colour fields plus noise, neither
flat (which decodes fast) nor pure noise (which decodes slowly)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int, quality: int) -> bytes:
    """One JPEG of ``width`` x ``height`` pixels: a bicubic-upsampled 8x6 random colour grid plus
    uniform noise of +-12 levels, encoded at ``quality``."""
    low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.integers(-12, 12, (height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()
