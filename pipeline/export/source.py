"""Find the checkpoint to export and read what it says about itself.

``qformer export`` accepts a checkpoint folder (``metadata.json`` + ``trainable.safetensors``, as
training writes it), a stage folder (whose ``complete.json`` names the stage's final checkpoint),
or a run folder together with a stage name; local or ``s3://``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors

from pipeline.io.storage import Location, exists, read_bytes
from pipeline.model.config import ModelSpec
from pipeline.spec.train import StageSpec
from pipeline.train.checkpoint import METADATA, TRAINABLE
from pipeline.train.run import COMPLETE


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked (missing, invalid, or an incompatible request)."""


@dataclass(frozen=True)
class CheckpointSource:
    """A training checkpoint folder and its metadata.

    Attributes:
        location: The checkpoint folder.
        metadata: Its ``metadata.json`` (stage, stage_index, step, spec, versions, ...).
        model_spec: The model section of the job spec it was trained with.
        stage: The curriculum stage that wrote it.
    """

    location: Location
    metadata: dict
    model_spec: ModelSpec
    stage: StageSpec

    @property
    def model_stage(self) -> Literal[1, 2]:
        """1: Q-Former representation learning; 2: generative learning with the LLM."""
        return self.stage.model_stage

    @property
    def step(self) -> int:
        """Optimizer steps the stage had taken."""
        return int(self.metadata.get("step", 0))


def resolve_checkpoint(
    path: str, *, stage: str | None = None, storage_options: dict | None = None
) -> CheckpointSource:
    """Resolve ``path`` (checkpoint, stage or run folder) to a checkpoint and read its metadata.

    Args:
        path: Local path or ``s3://`` URL of a checkpoint folder, a stage folder, or a run folder.
        stage: Stage name; needed for a run folder, and checked against the checkpoint otherwise.
        storage_options: fsspec options for ``s3://`` (endpoint, region, profile, anon).

    Returns:
        The checkpoint.

    Raises:
        ExportError: Nothing exportable at ``path``, or its metadata is invalid.
    """
    folder = Location.of(path)
    folder = Location(folder.url, storage_options or {})
    if not exists(folder):
        raise ExportError(f"{folder.url}: no such folder")
    if not exists(folder.child(METADATA)):
        folder = _final_checkpoint(folder, stage)
    if not exists(folder.child(TRAINABLE)):
        raise ExportError(f"{folder.url}: no {TRAINABLE}; not a checkpoint folder written by training")
    source = _read_source(folder)
    if stage is not None and source.stage.name != stage:
        raise ExportError(f"{folder.url} is a checkpoint of stage {source.stage.name!r}, not {stage!r}")
    return source


def _final_checkpoint(folder: Location, stage: str | None) -> Location:
    """A stage folder's (or a run folder's stage's) final checkpoint, from ``complete.json``."""
    marker = folder.child(COMPLETE)
    if not exists(marker):
        if stage is None:
            finished = _finished_stages(folder)
            hint = f"name one of its stages with --stage ({', '.join(finished)})" if finished else (
                "for a run folder, name the stage with --stage")
            raise ExportError(
                f"{folder.url}: neither a checkpoint folder ({METADATA}) nor a finished stage "
                f"folder ({COMPLETE}); {hint}"
            )
        marker = folder.child(stage, COMPLETE)
        if not exists(marker):
            raise ExportError(f"{folder.url}: stage {stage!r} has not finished (no {stage}/{COMPLETE})")
    try:
        done = json.loads(read_bytes(marker))
        checkpoint = Location(done["checkpoint"], folder.options)
    except (ValueError, KeyError, TypeError) as err:
        raise ExportError(f"{marker.url}: invalid ({err})") from err
    if not exists(checkpoint.child(METADATA)):
        raise ExportError(f"{marker.url} names {checkpoint.url}, which has no {METADATA}")
    return checkpoint


def _finished_stages(run: Location) -> list[str]:
    """Names of the sub-folders of ``run`` that hold a ``complete.json``."""
    fs, path = run.filesystem()
    names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))
    return sorted(name for name in names if exists(run.child(name, COMPLETE)))


def _read_source(folder: Location) -> CheckpointSource:
    where = folder.child(METADATA).url
    try:
        metadata = json.loads(read_bytes(folder.child(METADATA)))
        spec = metadata["spec"]
        index = int(metadata["stage_index"])
        model_spec = ModelSpec.model_validate(spec["model"])
        stage = StageSpec.model_validate(spec["stages"][index])
    except (ValueError, KeyError, TypeError, IndexError) as err:
        problem = f"{err.error_count()} invalid fields" if isinstance(err, ValidationError) else repr(err)
        raise ExportError(f"{where}: not the metadata of a training checkpoint ({problem})") from err
    return CheckpointSource(folder, metadata, model_spec, stage)


def load_trainable(source: CheckpointSource) -> tuple[dict[str, torch.Tensor], bytes]:
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
