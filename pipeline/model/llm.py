"""The frozen language model of stage 2 and its tokenizer."""

from __future__ import annotations

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipeline.assets import resolve_model, resolve_tokenizer
from pipeline.model.frozen import freeze, torch_dtype
from pipeline.spec.model import LLMSpec


def load_language_model(spec: LLMSpec, *, weights: bool = True) -> PreTrainedModel:
    """Load the causal LM of ``spec``, held in ``spec.dtype`` and frozen.

    Args:
        spec: The LLM section of the model spec.
        weights: False builds it from its config alone, reading no weights, on the current
            default device (under ``torch.device("meta")``: its shapes, for nothing).

    Returns:
        The frozen ``AutoModelForCausalLM``.
    """
    path, dtype = resolve_model(spec.name), torch_dtype(spec.dtype)
    if not weights:
        return freeze(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype))
    return freeze(AutoModelForCausalLM.from_pretrained(path, dtype=dtype))


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
