"""Rebuild a trained model from its spec and its trained weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipeline.assets import AssetError
from pipeline.export.source import ExportError
from pipeline.model.blip2 import Blip2Pretrainer, Stage
from pipeline.model.config import ModelSpec


def rebuild_model(
    spec: ModelSpec, stage: Stage, weights: Mapping[str, torch.Tensor], where: str
) -> Blip2Pretrainer:
    """The model of ``spec`` with its frozen towers loaded and ``weights`` as its trained parts.

    Args:
        spec: The model spec the weights were trained with.
        stage: 1 or 2.
        weights: Every trainable parameter by name (a checkpoint's ``trainable.safetensors``).
        where: Where the weights come from, for error messages.

    Returns:
        The model, in eval mode.

    Raises:
        ExportError: A tower cannot be loaded, or the weights do not fit the model exactly.
    """
    # Every trainable weight is overwritten below: copying BERT's in first would be wasted work.
    spec = spec.model_copy(update={"qformer": spec.qformer.model_copy(update={"load_bert_weights": False})})
    try:
        model = Blip2Pretrainer(spec, stage=stage)
    except (OSError, ValueError, AssetError, RuntimeError) as err:
        raise ExportError(f"cannot build the model its spec describes: {err}") from err
    try:
        model.load_trainable_state_dict(weights)
    except (KeyError, RuntimeError) as err:  # other names; other shapes
        raise ExportError(f"{where}: the weights do not fit the spec's model: {err.args[0]}") from err
    return model.eval()
