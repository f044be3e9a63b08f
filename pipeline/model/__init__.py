"""BLIP-2: frozen vision tower, trainable Q-Former, frozen LLM, and the pretraining losses.

Typical use::

    from pipeline.model import Blip2Pretrainer, ModelSpec, image_preprocessing

    spec = ModelSpec()                       # or the ``model:`` section of a job spec
    prep = image_preprocessing(spec.vision)  # mean, std and size for the data pipeline
    model = Blip2Pretrainer(spec, stage=1)
    out = model(pixel_values=images, input_ids=ids, attention_mask=mask)
    out.loss.backward()

The names below are imported on first use, so that ``pipeline.model.config`` (nested in the job
spec) loads without torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# pipeline.spec nests ModelSpec: initialise that package first, or importing this one first would
# make it import a half-built pipeline.model.config.
import pipeline.spec  # noqa: F401

if TYPE_CHECKING:
    from pipeline.model.blip2 import Blip2Pretrainer, Stage, Stage1Output, Stage2Output
    from pipeline.model.config import LLMSpec, LossSpec, ModelSpec, QFormerSpec, VisionTowerSpec
    from pipeline.model.distributed import DistContext
    from pipeline.model.frozen import ParameterCounts, count_parameters, freeze, is_frozen
    from pipeline.model.llm import build_llm_tokenizer
    from pipeline.model.qformer import DEC_TOKEN, build_qformer_tokenizer
    from pipeline.model.vision import ImagePreprocessing, image_preprocessing

_EXPORTS = {
    "pipeline.model.blip2": ("Blip2Pretrainer", "Stage", "Stage1Output", "Stage2Output"),
    "pipeline.model.config": ("LLMSpec", "LossSpec", "ModelSpec", "QFormerSpec", "VisionTowerSpec"),
    "pipeline.model.distributed": ("DistContext",),
    "pipeline.model.frozen": ("ParameterCounts", "count_parameters", "freeze", "is_frozen"),
    "pipeline.model.llm": ("build_llm_tokenizer",),
    "pipeline.model.qformer": ("DEC_TOKEN", "build_qformer_tokenizer"),
    "pipeline.model.vision": ("ImagePreprocessing", "image_preprocessing"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
