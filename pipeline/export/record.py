"""``qformer_export.json``: what an export folder holds and where it came from.

Both export formats write it. For our own format it is also the config the loader rebuilds the
model from (the model spec and the stage); for the transformers format it records the source and
what transformers' classes leave out.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.checkpoint.lookup import TrainedCheckpoint
from pipeline.versions import library_versions

EXPORT_RECORD = "qformer_export.json"
FORMAT_VERSION = 1
TRANSFORMERS_FORMAT = "transformers"
OWN_FORMAT = "qformer"


def export_record(source: TrainedCheckpoint, export_format: str, **details) -> dict:
    """The record of an export of ``source`` in ``export_format``, plus format-specific details."""
    return {
        "format": export_format,
        "format_version": FORMAT_VERSION,
        "stage": source.objective,
        "stage_name": source.stage.name,
        "step": source.step,
        "checkpoint": source.location.url,
        "model": source.job.model.model_dump(mode="json"),
        **details,
        "trained_with": source.metadata.get("versions", {}),
        "exported_with": library_versions(),
    }


def write_record(folder: Path, record: dict) -> None:
    (folder / EXPORT_RECORD).write_text(json.dumps(record, indent=1) + "\n")


def read_record(folder: Path) -> dict:
    """The export record of ``folder``.

    Raises:
        FileNotFoundError: ``folder`` is not an export folder.
    """
    path = Path(folder) / EXPORT_RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {EXPORT_RECORD}; not a folder written by qformer export")
    return json.loads(path.read_text())
