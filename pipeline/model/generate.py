"""Caption generation with a stage-2 model: the Q-Former's queries as a soft prompt of the frozen LLM.

As in BLIP-2 (LAVIS ``blip2_opt.generate``): the projected query outputs come first, then the
LLM's own leading special tokens and an optional text prompt, exactly as the training captions
were tokenized (``pipeline.data.tokenize``); the LLM continues greedily or with beam search until
its end-of-text token. Decoding runs through transformers' ``generate(inputs_embeds=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.model.blip2 import Blip2Pretrainer


@dataclass(frozen=True)
class DecodingSpec:
    """How captions are decoded.

    Attributes:
        num_beams: 1 decodes greedily, more runs beam search with that many beams.
        max_new_tokens: Most tokens generated per caption (end-of-text included).
        prompt: Text placed after the visual prompt (``""`` for none, as the stage-2 training
            captions of this pipeline have none).
        length_penalty: Beam search score exponent on the length (1.0: mean log-probability).
    """

    num_beams: int = 1
    max_new_tokens: int = 30
    prompt: str = ""
    length_penalty: float = 1.0

    def __post_init__(self):
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"num_beams and max_new_tokens must be >= 1, got {self.num_beams}, {self.max_new_tokens}"
            )


def prefix_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The token ids that precede a caption: the tokenizer's leading special tokens (a BOS for
    OPT or Llama tokenizers, nothing for SmolLM2) and the prompt, without any end-of-text."""
    ids = tokenizer(prompt)["input_ids"]
    while ids and ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id != tokenizer.bos_token_id:
        ids = ids[:-1]
    return list(ids)


@torch.no_grad()
def generate_captions(
    model: Blip2Pretrainer,
    tokenizer: PreTrainedTokenizerBase,
    pixel_values: torch.Tensor,
    decoding: DecodingSpec = DecodingSpec(),
    *,
    synced_gpus: bool = False,
) -> list[str]:
    """Caption a batch of images.

    Args:
        model: A stage-2 model (``Blip2Pretrainer(spec, stage=2)`` with trained weights loaded).
        tokenizer: The LLM's tokenizer (``pipeline.model.build_llm_tokenizer``).
        pixel_values: (B, 3, H, W) images normalised as in training.
        decoding: Greedy or beam search, length limit and prompt.
        synced_gpus: Keep decoding until every rank is done (needed when the model's parameters
            are partitioned across ranks, as under DeepSpeed ZeRO-3).

    Returns:
        The B captions, special tokens removed and whitespace stripped.
    """
    if model.objective != 2:
        raise ValueError("caption generation needs a model of objective 2 (one with the LLM)")
    _, visual = model.visual_prompt(pixel_values)  # (B, Q, D_llm)
    batch, device = visual.shape[0], visual.device
    prefix = torch.tensor(prefix_ids(tokenizer, decoding.prompt), dtype=torch.long, device=device)
    prefix_embeds = model.language_model.get_input_embeddings()(prefix)  # (P, D_llm)
    inputs_embeds = torch.cat(
        [visual, prefix_embeds.unsqueeze(0).expand(batch, -1, -1)], dim=1
    )  # (B, Q + P, D_llm)
    attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=device)  # (B, Q + P)
    output = model.language_model.generate(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        do_sample=False,
        num_beams=decoding.num_beams,
        max_new_tokens=decoding.max_new_tokens,
        length_penalty=decoding.length_penalty,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        synced_gpus=synced_gpus,
    )  # (B, T_new): with inputs_embeds only, decoder-only models return just the new tokens
    return [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]
