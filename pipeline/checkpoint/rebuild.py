"""The one way to rebuild a trained model: its spec's towers, its trained weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipeline.assets import AssetError
from pipeline.checkpoint.format import CheckpointError, load_trainable_weights
from pipeline.checkpoint.lookup import TrainedCheckpoint
from pipeline.model.blip2 import Blip2Pretrainer
from pipeline.spec.losses import Objective
from pipeline.spec.model import ModelSpec


def rebuild_model(
    spec: ModelSpec, objective: Objective, weights: Mapping[str, torch.Tensor], where: str
) -> Blip2Pretrainer:
    """The model of ``spec`` with its frozen towers loaded and ``weights`` as its trained parts.

    Args:
        spec: The model spec the weights were trained with.
        objective: 1 or 2.
        weights: Every trainable parameter by name (a checkpoint's ``trainable.safetensors``).
        where: Where the weights come from, for error messages.

    Returns:
        The model, in eval mode.

    Raises:
        CheckpointError: A tower cannot be loaded, or the weights do not fit the model exactly.
    """
    # Every trainable weight is overwritten below: copying BERT's in first would be wasted work.
    spec = spec.model_copy(update={"qformer": spec.qformer.model_copy(update={"init": "random"})})
    try:
        model = Blip2Pretrainer(spec, objective=objective)
    except (OSError, ValueError, AssetError, RuntimeError) as err:
        raise CheckpointError(f"cannot build the model its spec describes: {err}") from err
    try:
        model.load_trainable_state_dict(weights)
    except (KeyError, RuntimeError) as err:  # other names; other shapes
        raise CheckpointError(f"{where}: the weights do not fit the spec's model: {err.args[0]}") from err
    return model.eval()


def load_trained_model(checkpoint: TrainedCheckpoint) -> Blip2Pretrainer:
    """The model a training checkpoint holds, in eval mode.

    Raises:
        CheckpointError: unreadable weights, or weights that do not fit the spec's model.
    """
    weights = load_trainable_weights(checkpoint.location)
    return rebuild_model(checkpoint.model_spec, checkpoint.objective, weights, checkpoint.location.url)
