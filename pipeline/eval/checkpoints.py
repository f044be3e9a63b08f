"""Finding a training checkpoint and rebuilding its model for evaluation."""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline.eval.heldout import EvalError
from pipeline.io.storage import Location, exists, read_bytes
from pipeline.spec import JobSpec
from pipeline.spec.prep import StorageSpec
from pipeline.spec.train import StageSpec

TRAINABLE = "trainable.safetensors"
METADATA = "metadata.json"
COMPLETE = "complete.json"
SUMMARY = "summary.json"


@dataclass(frozen=True)
class EvalCheckpoint:
    """A checkpoint folder written by training, with the job spec it was trained under.

    Attributes:
        location: The checkpoint folder.
        metadata: Its ``metadata.json`` (stage, stage_index, step, spec, ...).
        job: The whole job spec of the run.
        stage: The spec of the stage that wrote it.
    """

    location: Location
    metadata: dict
    job: JobSpec
    stage: StageSpec

    @property
    def model_stage(self) -> int:
        """1 (Q-Former representation learning) or 2 (with the LLM)."""
        return self.stage.model_stage

    @property
    def step(self) -> int:
        return int(self.metadata["step"])

    def model_spec(self):
        """The model spec the stage trained with (its loss weights included)."""
        from pipeline.train.worker import model_spec_for

        return model_spec_for(self.job, self.stage)


def resolve_checkpoint(url: str, storage: StorageSpec | None = None) -> EvalCheckpoint:
    """Accept a checkpoint folder, a stage folder (its ``complete.json`` names the final
    checkpoint) or a run folder (the last stage of its ``summary.json``).

    Raises:
        EvalError: none of these, or an unreadable metadata file.
    """
    folder = Location.of(url, storage)
    if not exists(folder.child(TRAINABLE)):
        if exists(folder.child(COMPLETE)):
            folder = Location(json.loads(read_bytes(folder.child(COMPLETE)))["checkpoint"], folder.options)
        elif exists(folder.child(SUMMARY)):
            stages = json.loads(read_bytes(folder.child(SUMMARY)))["stages"]
            if not stages:
                raise EvalError(f"checkpoint: {url}/{SUMMARY} lists no finished stage")
            folder = Location(stages[-1]["checkpoint"], folder.options)
        else:
            raise EvalError(
                f"checkpoint: {url} is not a checkpoint folder ({TRAINABLE} + {METADATA}), a stage "
                f"folder ({COMPLETE}) or a run folder ({SUMMARY})"
            )
    return load_checkpoint(folder)


def load_checkpoint(folder: Location) -> EvalCheckpoint:
    """The checkpoint in ``folder`` (which holds ``metadata.json`` and the trained weights).

    Raises:
        EvalError: no or an unusable ``metadata.json``.
    """
    if not exists(folder.child(METADATA)):
        raise EvalError(f"checkpoint: {folder.url} has no {METADATA}")
    metadata = json.loads(read_bytes(folder.child(METADATA)))
    try:
        job = JobSpec.model_validate(metadata["spec"])
        stage = job.stages[metadata["stage_index"]]
    except (KeyError, IndexError, ValueError) as err:
        raise EvalError(f"checkpoint: {folder.url}/{METADATA} does not hold a usable job spec: {err}") from None
    return EvalCheckpoint(folder, metadata, job, stage)


def build_model(checkpoint: EvalCheckpoint):
    """The stage's model with the checkpoint's trained weights, in eval mode."""
    import transformers

    from pipeline.model import Blip2Pretrainer
    from pipeline.train.checkpoint import load_trainable_weights

    transformers.logging.set_verbosity_error()
    model = Blip2Pretrainer(checkpoint.model_spec(), stage=checkpoint.model_stage)
    model.load_trainable_state_dict(load_trainable_weights(checkpoint.location))
    return model.eval()
