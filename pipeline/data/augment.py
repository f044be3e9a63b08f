"""Prepared JPEG bytes to a model input's image: decode, (augment,) resize, with Pillow and numpy
only; the 8-bit pixels are normalised later, on the model's device (``pipeline.data.batches``).
Training and evaluation both use it (evaluation without augmentation).

Augmentation is BLIP-2's: a random resized crop (area fraction ``crop_scale``, aspect ratio
3/4..4/3, bicubic) and a horizontal flip with probability 1/2. Every random draw comes from a
generator the caller seeds per sample, so a resumed run augments exactly like an uninterrupted one.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

_RATIO = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10


def crop_box(
    width: int, height: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """A random crop of ``scale`` of the area with an aspect ratio in [3/4, 4/3].

    Same sampling as torchvision's ``RandomResizedCrop``: up to ten tries, then the centre crop
    of the whole image clamped to the ratio range.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        scale: (low, high) fraction of the image area the crop covers.
        rng: The sample's generator.

    Returns:
        The ``(left, top, right, bottom)`` box, inside the image.
    """
    area = width * height
    log_low, log_high = math.log(_RATIO[0]), math.log(_RATIO[1])
    for _ in range(_CROP_ATTEMPTS):
        target = area * rng.uniform(scale[0], scale[1])
        ratio = math.exp(rng.uniform(log_low, log_high))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < _RATIO[0]:
        w, h = width, round(width / _RATIO[0])
    elif ratio > _RATIO[1]:
        w, h = round(height * _RATIO[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


@dataclass(frozen=True)
class TrainTransform:
    """Decode a prepared JPEG and turn it into a square ``image_size`` RGB array.

    Args:
        image_size: Output side in pixels.
        augment: Random resized crop (+ flip); when False the image is only resized.
        crop_scale: (low, high) area fraction of the random crop.
        hflip: Flip horizontally with probability 1/2 (only when ``augment``).
    """

    image_size: int
    augment: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True

    def __call__(self, data: bytes, rng: np.random.Generator | None) -> np.ndarray:
        """Return the (image_size, image_size, 3) uint8 image; ``rng`` is needed when augmenting.

        Raises:
            OSError, ValueError: the bytes are not a decodable image.
        """
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB") if image.mode != "RGB" else image
            width, height = image.size
            size = self.image_size
            flip = False
            if self.augment:
                box = crop_box(width, height, self.crop_scale, rng)
                flip = self.hflip and rng.random() < 0.5
            else:
                # Prepared images are square already; the centre square only guards other inputs.
                box = _centre_square(width, height)
            if box == (0, 0, width, height) and (width, height) == (size, size):
                out = image
            else:
                out = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
            if flip:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return np.asarray(out, dtype=np.uint8)  # (S, S, 3)
