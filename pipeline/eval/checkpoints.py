"""Finding a training checkpoint (``pipeline.train.trained``) and rebuilding its model for
evaluation."""

from __future__ import annotations

from pipeline.eval.heldout import EvalError
from pipeline.io.storage import Location
from pipeline.spec.storage import StorageSpec
from pipeline.train.trained import CheckpointNotFound, TrainedCheckpoint, find_checkpoint, read_checkpoint


def resolve_checkpoint(url: str, storage: StorageSpec | None = None) -> TrainedCheckpoint:
    """Accept a checkpoint folder, a stage folder (its final checkpoint) or a run folder (the
    last stage of its ``summary.json``).

    Raises:
        EvalError: none of these, or unusable metadata.
    """
    try:
        return find_checkpoint(Location.of(url, storage))
    except CheckpointNotFound as err:
        raise EvalError(f"checkpoint: {err}") from None


def load_checkpoint(folder: Location) -> TrainedCheckpoint:
    """The checkpoint in ``folder`` (which holds ``metadata.json`` and the trained weights).

    Raises:
        EvalError: no or an unusable ``metadata.json``.
    """
    try:
        return read_checkpoint(folder)
    except CheckpointNotFound as err:
        raise EvalError(f"checkpoint: {err}") from None


def build_model(checkpoint: TrainedCheckpoint):
    """The stage's model with the checkpoint's trained weights, in eval mode."""
    import transformers

    from pipeline.model import Blip2Pretrainer
    from pipeline.train.checkpoint import load_trainable_weights

    transformers.logging.set_verbosity_error()
    model = Blip2Pretrainer(checkpoint.model_spec(), stage=checkpoint.model_stage)
    model.load_trainable_state_dict(load_trainable_weights(checkpoint.location))
    return model.eval()
