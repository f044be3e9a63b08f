"""Finding what training wrote: a checkpoint from a checkpoint, stage or run folder.

``qformer eval`` and ``qformer export`` accept any of these (local or ``s3://``):

- a checkpoint folder (``metadata.json`` + ``trainable.safetensors``, as training writes it);
- a stage folder, meaning its final checkpoint (named by its ``complete.json``);
- a run folder with a stage name (that stage's final checkpoint), or without one, the last
  finished stage of its ``summary.json``.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

from pydantic import ValidationError

from pipeline.checkpoint.format import COMPLETE, METADATA, SUMMARY, TRAINABLE, CheckpointError
from pipeline.io.storage import Location, exists, read_bytes
from pipeline.spec import JobSpec
from pipeline.spec.losses import Objective
from pipeline.spec.model import ModelSpec
from pipeline.spec.train import StageSpec


class CheckpointNotFound(CheckpointError):
    """No usable checkpoint where one was asked for (one line saying why)."""


@dataclass(frozen=True)
class TrainedCheckpoint:
    """A checkpoint folder written by training, with the job spec it was trained under.

    Attributes:
        location: The checkpoint folder.
        metadata: Its ``metadata.json`` (stage, stage_index, step, spec, versions, ...).
        job: The whole job spec of the run.
        stage: The curriculum stage that wrote it.
    """

    location: Location
    metadata: dict
    job: JobSpec
    stage: StageSpec

    @property
    def objective(self) -> Objective:
        """1: Q-Former representation learning; 2: generative learning with the LLM."""
        return self.stage.objective

    @property
    def model_spec(self) -> ModelSpec:
        """The model spec the stage trained with."""
        return self.job.model

    @property
    def run_folder(self) -> Location:
        """The run folder holding the checkpoint's stage folder."""
        return Location(posixpath.dirname(posixpath.dirname(self.location.url)), self.location.options)

    @property
    def step(self) -> int:
        """Optimizer steps the stage had taken."""
        return int(self.metadata["step"])


def find_checkpoint(folder: Location, stage: str | None = None) -> TrainedCheckpoint:
    """The checkpoint that ``folder`` (a checkpoint, stage or run folder) stands for.

    Args:
        folder: A checkpoint folder, a stage folder or a run folder.
        stage: A stage name: picks the stage of a run folder, and must match otherwise.

    Raises:
        CheckpointNotFound: nothing of the kinds above at ``folder``, an unfinished stage, or
            metadata that is not a training checkpoint's.
    """
    if not exists(folder):
        raise CheckpointNotFound(f"{folder.url}: no such folder")
    if not exists(folder.child(METADATA)):
        folder = _final_checkpoint(folder, stage)
    if not exists(folder.child(TRAINABLE)):
        raise CheckpointNotFound(f"{folder.url}: no {TRAINABLE}; not a checkpoint folder written by training")
    checkpoint = read_checkpoint(folder)
    if stage is not None and checkpoint.stage.name != stage:
        raise CheckpointNotFound(f"{folder.url} is a checkpoint of stage {checkpoint.stage.name!r}, not {stage!r}")
    return checkpoint


def read_checkpoint(folder: Location) -> TrainedCheckpoint:
    """The checkpoint in ``folder``, from its ``metadata.json``.

    Raises:
        CheckpointNotFound: no ``metadata.json``, or not a training checkpoint's.
    """
    where = folder.child(METADATA)
    try:
        raw = read_bytes(where)
    except FileNotFoundError:
        raise CheckpointNotFound(f"{folder.url}: no {METADATA}") from None
    try:
        metadata = json.loads(raw)
        job = JobSpec.model_validate(metadata["spec"])
        stage = job.stages[int(metadata["stage_index"])]
        int(metadata["step"])
    except (ValueError, KeyError, TypeError, IndexError) as err:
        problem = f"{err.error_count()} invalid fields" if isinstance(err, ValidationError) else repr(err)
        raise CheckpointNotFound(f"{where.url}: not the metadata of a training checkpoint ({problem})") from None
    return TrainedCheckpoint(folder, metadata, job, stage)


def _final_checkpoint(folder: Location, stage: str | None) -> Location:
    """A stage folder's, or a run folder's stage's, final checkpoint."""
    if exists(folder.child(COMPLETE)):
        marker = folder.child(COMPLETE)
    elif stage is not None:
        marker = folder.child(stage, COMPLETE)
        if not exists(marker):
            raise CheckpointNotFound(f"{folder.url}: stage {stage!r} has not finished (no {stage}/{COMPLETE})")
    elif exists(folder.child(SUMMARY)):
        return _last_stage_checkpoint(folder)
    else:
        finished = _finished_stages(folder)
        hint = f"name one of its stages with --stage ({', '.join(finished)})" if finished else (
            "for a run folder, name the stage with --stage")
        raise CheckpointNotFound(
            f"{folder.url}: neither a checkpoint folder ({METADATA}) nor a finished stage folder "
            f"({COMPLETE}) nor a run folder ({SUMMARY}); {hint}"
        )
    try:
        checkpoint = Location(json.loads(read_bytes(marker))["checkpoint"], folder.options)
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointNotFound(f"{marker.url}: invalid ({err!r})") from None
    if not exists(checkpoint.child(METADATA)):
        raise CheckpointNotFound(f"{marker.url} names {checkpoint.url}, which has no {METADATA}")
    return checkpoint


def _last_stage_checkpoint(run: Location) -> Location:
    """The final checkpoint of the last stage a run's ``summary.json`` lists."""
    try:
        stages = json.loads(read_bytes(run.child(SUMMARY)))["stages"]
        return Location(stages[-1]["checkpoint"], run.options)
    except (ValueError, KeyError, TypeError, IndexError):
        raise CheckpointNotFound(f"{run.child(SUMMARY).url} lists no finished stage") from None


def _finished_stages(run: Location) -> list[str]:
    """Names of the sub-folders of ``run`` that hold a ``complete.json``."""
    fs, path = run.filesystem()
    names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))
    return sorted(name for name in names if exists(run.child(name, COMPLETE)))
