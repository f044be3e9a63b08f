"""Find the checkpoint to export (``pipeline.checkpoint.lookup``)."""

from __future__ import annotations

from pipeline.checkpoint.lookup import TrainedCheckpoint, find_checkpoint
from pipeline.errors import UsageError
from pipeline.io.storage import Location


class ExportError(UsageError, ValueError):
    """The checkpoint cannot be exported as asked (an incompatible request or output folder)."""


def resolve_checkpoint(
    path: str, *, stage: str | None = None, storage_options: dict | None = None
) -> TrainedCheckpoint:
    """Resolve ``path`` (checkpoint, stage or run folder) to a checkpoint and read its metadata.

    Args:
        path: Local path or ``s3://`` URL of a checkpoint folder, a stage folder, or a run folder.
        stage: Stage name; picks the stage of a run folder, and is checked against the checkpoint
            otherwise.
        storage_options: fsspec options for ``s3://`` (endpoint, region, profile, anon).

    Raises:
        CheckpointNotFound: Nothing exportable at ``path``, or its metadata is invalid.
    """
    return find_checkpoint(Location(Location.of(path).url, storage_options or {}), stage)
