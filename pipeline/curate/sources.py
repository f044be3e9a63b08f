"""Where a curation model comes from, and the image inputs our own models take.

A captioner or ranker is one of our training checkpoints (a checkpoint, stage or run folder, as
``qformer eval`` takes) or a transformers model (hub id or folder: a transformers-format
``qformer export`` is one).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from pipeline.assets import resolve_model
from pipeline.checkpoint.format import COMPLETE, METADATA, SUMMARY
from pipeline.checkpoint.lookup import TrainedCheckpoint, find_checkpoint
from pipeline.data.augment import TrainTransform
from pipeline.data.batches import PixelNormalizer
from pipeline.errors import UsageError
from pipeline.io.storage import Location, exists
from pipeline.model.vision import ImagePreprocessing
from pipeline.spec.curate import ModelKind
from pipeline.spec.storage import StorageSpec


class CurateModelError(UsageError, ValueError):
    """A captioner or ranker cannot be used as asked (not found, wrong stage, wrong kind)."""


def our_checkpoint(model: str, kind: ModelKind, stage: str | None, storage: StorageSpec,
                   objectives: tuple[int, ...], field: str) -> TrainedCheckpoint | None:
    """The training checkpoint ``model`` names, or None when it is a transformers model.

    Args:
        objectives: The stages (objectives) whose checkpoints the ``field`` model can be.

    Raises:
        CurateModelError: a checkpoint of another objective, or ``kind: checkpoint`` for
            something that is not one.
    """
    if kind == "transformers":
        return None
    location = Location.of(model, storage)
    if kind == "auto" and not any(exists(location.child(name)) for name in (METADATA, COMPLETE, SUMMARY)):
        return None
    checkpoint = find_checkpoint(location, stage)
    if checkpoint.objective not in objectives:
        raise CurateModelError(
            f"{field}.model: {checkpoint.location.url} is a stage-{checkpoint.objective} checkpoint; "
            f"the {field} needs one of stage {' or '.join(map(str, objectives))}")
    return checkpoint


def transformers_name(model: str) -> str:
    """A hub id or folder for ``from_pretrained`` (``pypi:``/``tiny:`` names resolved)."""
    return resolve_model(model)


class PixelBatcher:
    """Prepared JPEG bytes -> the (B, 3, S, S) normalised ``pixel_values`` our models take
    (resized, not augmented, as in evaluation)."""

    def __init__(self, preprocessing: ImagePreprocessing):
        self.transform = TrainTransform(preprocessing.image_size, augment=False)
        self.normalize = PixelNormalizer(preprocessing.mean, preprocessing.std)

    def __call__(self, images: list[bytes]) -> torch.Tensor:
        size = self.transform.image_size
        pixels = np.empty((len(images), 3, size, size), np.uint8)  # (B, 3, S, S)
        for row, data in enumerate(images):
            pixels[row] = self.transform(data, None).transpose(2, 0, 1)  # (S, S, 3) -> (3, S, S)
        return self.normalize(torch.from_numpy(pixels))


def decode_rgb(data: bytes) -> Image.Image:
    """A prepared JPEG as an RGB image (for transformers processors)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")
