"""Rows of prepared shards -> the model's keyword arguments: one builder that training and
evaluation share.

Images leave the builder as 8-bit pixels (a quarter of the bytes of float32) and are normalised
on the model's device (:class:`PixelNormalizer`): on a GPU the copy is smaller and the arithmetic
free; the decode threads only decode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch

from pipeline.data.augment import TrainTransform
from pipeline.data.prepared import IMAGE, MODEL_INPUTS, TOKEN_COLUMNS, TextKind, token_matrix

PIXELS = "pixel_values"
"""The model input holding the images: (B, 3, S, S), uint8 from the builder, float32 once normalised."""


class ImageDecodeError(ValueError):
    """Row ``row`` of a batch holds an image that cannot be decoded (``cause`` says why)."""

    def __init__(self, row: int, cause: BaseException):
        super().__init__(f"cannot decode its image: {type(cause).__name__}: {cause}")
        self.row, self.cause = row, cause


class InputBuilder:
    """Prepared rows -> ``pixel_values`` (B, 3, S, S) uint8 and the (B, L) int64 token ids and
    mask of one text kind, under the model's argument names.

    Args:
        transform: Decodes (and, given a generator per row, augments) one JPEG to (S, S, 3) uint8.
        text: Whose token columns to read.
        pin_memory: Put the batch in page-locked memory (for a fast, asynchronous copy to a GPU).
    """

    def __init__(self, transform: TrainTransform, text: TextKind, *, pin_memory: bool = False):
        self.transform, self.text, self.pin_memory = transform, text, pin_memory

    @property
    def columns(self) -> tuple[str, ...]:
        """The prepared columns a batch needs."""
        return (IMAGE, *TOKEN_COLUMNS[self.text])

    def __call__(self, rows: pa.Table, rngs: Sequence[np.random.Generator] | None = None) -> dict[str, torch.Tensor]:
        """The model inputs of ``rows``; ``rngs`` (one per row) when the transform augments.

        Raises:
            ImageDecodeError: a row's image cannot be decoded.
        """
        size = self.transform.image_size
        pixels = np.empty((rows.num_rows, 3, size, size), np.uint8)  # (B, 3, S, S)
        for j, data in enumerate(rows.column(IMAGE).to_pylist()):
            try:
                pixels[j] = self.transform(data, rngs[j] if rngs else None).transpose(2, 0, 1)
            except Exception as error:
                raise ImageDecodeError(j, error) from error
        inputs = {PIXELS: torch.from_numpy(pixels)}
        for column, name in zip(TOKEN_COLUMNS[self.text], MODEL_INPUTS[self.text]):
            inputs[name] = torch.from_numpy(token_matrix(rows.column(column)))  # (B, L)
        if self.pin_memory:
            inputs = {name: tensor.pin_memory() for name, tensor in inputs.items()}
        return inputs


class PixelNormalizer:
    """(B, 3, S, S) uint8 pixels -> float32 ``(pixel / 255 - mean) / std``, on the pixels' device.

    Args:
        mean: Per-channel mean, for pixels in [0, 1].
        std: Per-channel standard deviation.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.device not in self._constants:
            shape = (1, 3, 1, 1)
            self._constants[pixels.device] = (
                torch.tensor(self.mean, device=pixels.device).view(shape) * 255,
                torch.tensor(self.std, device=pixels.device).view(shape) * 255,
            )
        mean, std = self._constants[pixels.device]
        return (pixels.float() - mean) / std  # (B, 3, S, S)


def to_device(inputs: Mapping[str, torch.Tensor], device: torch.device | str,
              normalizer: PixelNormalizer) -> dict[str, torch.Tensor]:
    """A builder's batch on ``device`` (copied asynchronously from pinned memory), its pixels
    normalised there."""
    moved = {name: tensor.to(device, non_blocking=True) for name, tensor in inputs.items()}
    moved[PIXELS] = normalizer(moved[PIXELS])
    return moved
