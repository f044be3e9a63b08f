"""BLIP-2: frozen vision tower, trainable Q-Former, frozen LLM, and the pretraining losses.

Typical use::

    from pipeline.model import Blip2Pretrainer, image_preprocessing
    from pipeline.spec.model import ModelSpec

    spec = ModelSpec()                       # or the ``model:`` section of a job spec
    prep = image_preprocessing(spec.vision)  # mean, std and size for the data pipeline
    model = Blip2Pretrainer(spec, objective=1)
    out = model(pixel_values=images, input_ids=ids, attention_mask=mask)
    out.loss.backward()
"""

from pipeline.model.blip2 import Blip2Pretrainer, Stage1Output, Stage2Output
from pipeline.model.distributed import DistContext
from pipeline.model.frozen import ParameterCounts, count_parameters, freeze, is_frozen
from pipeline.model.llm import build_llm_tokenizer
from pipeline.model.qformer import DEC_TOKEN, build_qformer_tokenizer
from pipeline.model.vision import ImagePreprocessing, image_preprocessing

__all__ = [
    "DEC_TOKEN",
    "Blip2Pretrainer",
    "DistContext",
    "ImagePreprocessing",
    "ParameterCounts",
    "Stage1Output",
    "Stage2Output",
    "build_llm_tokenizer",
    "build_qformer_tokenizer",
    "count_parameters",
    "freeze",
    "image_preprocessing",
    "is_frozen",
]
