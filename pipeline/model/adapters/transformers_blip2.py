"""Our BLIP-2 weights <-> transformers' Blip2 classes: the one home of that name mapping.

``qformer export`` writes with :func:`to_transformers`; ``init_from`` reads a transformers Blip2
folder or hub id with :func:`from_transformers`. Our parameter names already follow transformers'
(:mod:`pipeline.model.blip2`), with two exceptions:

- ``ln_vision`` is the vision tower's ``vision_model.post_layernorm`` there (our tower's own
  post-norm is an identity, see :func:`pipeline.model.vision.adopt_output_norm`);
- the ITG head ``lm_head.*`` and the ITC temperature ``temp`` have no place in transformers'
  classes (``Blip2ForImageTextRetrieval`` returns the plain cosine similarity, and transformers'
  own LAVIS conversion drops both). An export keeps them beside ``model.safetensors`` in
  :data:`PRETRAINING_FILE`, under our names, which transformers ignores and an import restores.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, PreTrainedModel

from pipeline.spec.losses import Objective

TRANSFORMERS_CLASSES: dict[Objective, type[PreTrainedModel]] = {
    1: Blip2ForImageTextRetrieval,
    2: Blip2ForConditionalGeneration,
}
"""The transformers class each objective's model is written as."""

PRETRAINING_ONLY = ("temp", "lm_head.")
"""Our parameters (names or prefixes) with no place in transformers' classes."""

PRETRAINING_FILE = "qformer_pretraining.safetensors"
"""The file beside ``model.safetensors`` that holds the :data:`PRETRAINING_ONLY` tensors."""

_LN_VISION = ("ln_vision.", "vision_model.post_layernorm.")  # (ours, transformers')


def to_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under transformers' Blip2 names, without the :data:`PRETRAINING_ONLY`
    tensors (take those with :func:`pretraining_only`)."""
    ours, theirs = _LN_VISION
    return {_swap_prefix(name, ours, theirs): tensor for name, tensor in state.items()
            if not name.startswith(PRETRAINING_ONLY)}


def pretraining_only(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of our state dict that transformers' classes cannot hold, under our names."""
    return {name: tensor for name, tensor in state.items() if name.startswith(PRETRAINING_ONLY)}


def from_transformers(
    state: Mapping[str, torch.Tensor], beside: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """A transformers Blip2 state dict (and the :data:`PRETRAINING_FILE` tensors beside it, if
    any) under our names. Names with no counterpart of ours are kept as they are."""
    return {**{our_name(name): tensor for name, tensor in state.items()}, **(beside or {})}


def our_name(name: str) -> str:
    """Our name of a transformers Blip2 tensor."""
    ours, theirs = _LN_VISION
    return _swap_prefix(name, theirs, ours)


def _swap_prefix(name: str, old: str, new: str) -> str:
    return new + name.removeprefix(old) if name.startswith(old) else name
