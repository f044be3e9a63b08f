"""Rows of prepared shards -> the model's keyword arguments: one builder that training and
evaluation share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from pipeline.data.augment import TrainTransform, normalization_table, to_normalized_chw
from pipeline.data.prepared import IMAGE, MODEL_INPUTS, TOKEN_COLUMNS, TextKind, token_matrix


class ImageDecodeError(ValueError):
    """Row ``row`` of a batch holds an image that cannot be decoded (``cause`` says why)."""

    def __init__(self, row: int, cause: BaseException):
        super().__init__(f"cannot decode its image: {type(cause).__name__}: {cause}")
        self.row, self.cause = row, cause


class InputBuilder:
    """Prepared rows -> ``pixel_values`` (B, 3, S, S) float32, normalised, and the (B, L) int64
    token ids and mask of one text kind under the model's argument names.

    Args:
        transform: Decodes (and, given a generator per row, augments) one JPEG to (S, S, 3) uint8.
        mean: Per-channel normalisation mean, for pixels in [0, 1].
        std: Per-channel normalisation standard deviation.
        text: Whose token columns to read.
    """

    def __init__(self, transform: TrainTransform, mean: Sequence[float], std: Sequence[float],
                 text: TextKind):
        self.transform, self.text = transform, text
        self.normalization = normalization_table(tuple(mean), tuple(std))

    @classmethod
    def resize_only(cls, image_size: int, mean: Sequence[float], std: Sequence[float],
                    text: TextKind) -> "InputBuilder":
        """A builder that only resizes images (evaluation: no augmentation)."""
        return cls(TrainTransform(image_size, augment=False), mean, std, text)

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
        pixels = np.empty((rows.num_rows, 3, size, size), np.float32)  # (B, 3, S, S)
        for j, data in enumerate(rows.column(IMAGE).to_pylist()):
            try:
                to_normalized_chw(self.transform(data, rngs[j] if rngs else None), self.normalization, pixels[j])
            except Exception as error:
                raise ImageDecodeError(j, error) from error
        inputs = {"pixel_values": torch.from_numpy(pixels)}
        for column, name in zip(TOKEN_COLUMNS[self.text], MODEL_INPUTS[self.text]):
            inputs[name] = torch.from_numpy(token_matrix(rows.column(column)))  # (B, L)
        return inputs
