"""Find the checkpoint to export (``pipeline.train.trained``) and read its trained weights."""

from __future__ import annotations

import torch
from safetensors.torch import load as load_safetensors

from pipeline.errors import UsageError
from pipeline.io.storage import Location, read_bytes
from pipeline.train.checkpoint import TRAINABLE
from pipeline.train.trained import CheckpointNotFound, TrainedCheckpoint, find_checkpoint


class ExportError(UsageError, ValueError):
    """The checkpoint cannot be exported as asked (missing, invalid, or an incompatible request)."""


def resolve_checkpoint(
    path: str, *, stage: str | None = None, storage_options: dict | None = None
) -> TrainedCheckpoint:
    """Resolve ``path`` (checkpoint, stage or run folder) to a checkpoint and read its metadata.

    Args:
        path: Local path or ``s3://`` URL of a checkpoint folder, a stage folder, or a run folder.
        stage: Stage name; picks the stage of a run folder, and is checked against the checkpoint
            otherwise.
        storage_options: fsspec options for ``s3://`` (endpoint, region, profile, anon).

    Returns:
        The checkpoint.

    Raises:
        ExportError: Nothing exportable at ``path``, or its metadata is invalid.
    """
    try:
        return find_checkpoint(Location(Location.of(path).url, storage_options or {}), stage)
    except CheckpointNotFound as err:
        raise ExportError(str(err)) from None


def load_trainable(source: TrainedCheckpoint) -> tuple[dict[str, torch.Tensor], bytes]:
    """The checkpoint's consolidated trainable weights by parameter name, and the file's bytes.

    Raises:
        ExportError: The file is not a readable safetensors file.
    """
    file = source.location.child(TRAINABLE)
    data = read_bytes(file)
    try:
        return load_safetensors(data), data
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ExportError(f"{file.url}: unreadable ({err})") from err
