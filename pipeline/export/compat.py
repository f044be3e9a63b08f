"""Whether a trained model is exactly representable by transformers' Blip2 classes.

``Blip2ForImageTextRetrieval`` and ``Blip2ForConditionalGeneration`` (transformers 5) hold a
``Blip2VisionModel`` whose ``post_layernorm`` plays our ``ln_vision``, run it at its configured
image size (the retrieval class cannot interpolate position embeddings), and mark the visual
prompt in the LLM's input ids with an ``<image>`` token that ``Blip2Processor`` adds to the LLM
tokenizer; its id must be a row of the frozen LLM's embedding table.
"""

from __future__ import annotations

import copy

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from pipeline.model.blip2 import Blip2Pretrainer
from pipeline.model.vision import image_preprocessing

IMAGE_TOKEN = "<image>"
"""The placeholder ``Blip2Processor`` puts in the input ids where the visual prompt goes."""

_BLIP2_TOWER = "blip_2_vision_model"


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id ``<image>`` gets in ``tokenizer`` once ``Blip2Processor`` has added it."""
    probe = copy.deepcopy(tokenizer)
    probe.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    return probe.convert_tokens_to_ids(IMAGE_TOKEN)


def transformers_blockers(model: Blip2Pretrainer, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Why ``model`` cannot be written as an exactly equivalent transformers Blip2 model.

    Args:
        model: The trained model (stage 1 or 2).
        tokenizer: The processor's tokenizer: the Q-Former's for stage 1, the LLM's for stage 2.

    Returns:
        One sentence per blocker; empty when the export is exact.
    """
    reasons = []
    tower = model.vision_model
    config = tower.config
    if config.model_type != _BLIP2_TOWER:
        reasons.append(
            f"the vision tower is a {type(tower).__name__} ({model.spec.vision.name}); transformers' "
            "Blip2 classes hold a Blip2VisionModel (EVA/BLIP ViT), which cannot compute it"
        )
    else:
        if model.ln_vision.eps != config.layer_norm_eps:
            reasons.append(
                f"ln_vision uses eps {model.ln_vision.eps} but the tower's post_layernorm (which "
                f"transformers would use in its place) uses eps {config.layer_norm_eps}"
            )
        size = image_preprocessing(model.spec.vision).image_size
        if size != config.image_size:
            reasons.append(
                f"the model was trained on {size} px images but the tower's position embeddings "
                f"are for {config.image_size} px; transformers' Blip2 classes do not interpolate "
                "them by default (Blip2ForImageTextRetrieval cannot at all)"
            )
    if model.objective == 2:
        llm_config = model.language_model.config
        if llm_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            reasons.append(f"the LLM ({llm_config.model_type}) is not a transformers causal LM type")
        rows = model.language_model.get_input_embeddings().num_embeddings
        token = image_token_id(tokenizer)
        if token >= rows:
            reasons.append(
                f"the LLM's embedding table has no spare row for Blip2Processor's {IMAGE_TOKEN} "
                f"token (it would get id {token}, the table has {rows} rows); adding a row would "
                "add an output class to the frozen LLM"
            )
    return reasons
