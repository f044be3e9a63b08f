"""The frozen language model of stage 2 and its tokenizer."""

from __future__ import annotations

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipeline.assets import is_config_only, model_config, resolve_model, resolve_tokenizer
from pipeline.model.frozen import freeze, torch_dtype
from pipeline.spec.model import LLMSpec


def load_language_model(spec: LLMSpec, *, weights: bool = True) -> PreTrainedModel:
    """Load the causal LM of ``spec`` (for a ``config:`` name, or ``weights=False``: build it
    with random weights, on torch's default device), held in ``spec.dtype`` and frozen.

    Args:
        spec: The LLM section of the model spec.
        weights: False builds it from its config alone, reading no weights, on the current
            default device (under ``torch.device("meta")``: its shapes, for nothing).

    Returns:
        The frozen ``AutoModelForCausalLM``.
    """
    dtype = torch_dtype(spec.dtype)
    if not weights or is_config_only(spec.name):
        model = AutoModelForCausalLM.from_config(model_config(spec.name), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(spec.name), dtype=dtype)
    return freeze(model)


def build_llm_tokenizer(spec: LLMSpec) -> PreTrainedTokenizerBase:
    """The LLM's own tokenizer, set up for right-padded captions.

    Tokenizers without a pad token (GPT-2, Llama) pad with eos; the padding is masked out of the
    loss by the attention mask, so the choice of pad id does not matter.

    Args:
        spec: The LLM section of the model spec.

    Returns:
        The tokenizer, ``padding_side="right"``, with a pad token.
    """
    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer(spec.name))
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
