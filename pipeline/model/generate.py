"""Caption generation with a stage-2 model: the Q-Former's queries as a soft prompt of the frozen LLM.

As in BLIP-2 (LAVIS ``blip2_opt.generate``): the projected query outputs come first, then the
LLM's own leading special tokens and an optional text prompt, exactly as the training captions
were tokenized (``pipeline.data.tokenize``); the LLM continues greedily or with beam search until
its end-of-text token, or samples several captions per image (nucleus sampling, as BLIP's
CapFilt). Decoding runs through transformers' ``generate(inputs_embeds=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        do_sample: Sample the tokens (nucleus sampling) instead of searching for the likeliest.
        top_p: Sampling: draw among the likeliest tokens holding this much probability.
        temperature: Sampling: softmax temperature.
        num_return_sequences: Captions per image.
    """

    num_beams: int = 1
    max_new_tokens: int = 30
    prompt: str = ""
    length_penalty: float = 1.0
    do_sample: bool = False
    top_p: float = 1.0
    temperature: float = 1.0
    num_return_sequences: int = 1

    def __post_init__(self):
        if self.num_beams < 1 or self.max_new_tokens < 1 or self.num_return_sequences < 1:
            raise ValueError(
                f"num_beams, max_new_tokens and num_return_sequences must be >= 1, got {self.num_beams}, "
                f"{self.max_new_tokens}, {self.num_return_sequences}"
            )
        if not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise ValueError(f"need 0 < top_p <= 1 and temperature > 0, got {self.top_p}, {self.temperature}")
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ValueError("num_return_sequences > num_beams needs do_sample")

    def generate_kwargs(self) -> dict:
        """The matching keyword arguments of transformers' ``generate``."""
        kwargs = {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens,
                  "length_penalty": self.length_penalty, "do_sample": self.do_sample,
                  "num_return_sequences": self.num_return_sequences}
        if self.do_sample:
            kwargs.update(top_p=self.top_p, temperature=self.temperature, top_k=0)
        return kwargs


def seeded_per_image(seeds: Sequence[int], device: torch.device, generate_one) -> list:
    """``generate_one(i)`` for each image ``i`` with torch's generators seeded by ``seeds[i]``, so
    that an image's sampled captions depend on its seed alone, not on the batch it came in;
    the caller's random state is restored afterwards."""
    devices = [device] if device.type == "cuda" else []
    results = []
    with torch.random.fork_rng(devices=devices):
        for index, seed in enumerate(seeds):
            torch.manual_seed(seed)
            results.append(generate_one(index))
    return results


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
    seeds: Sequence[int] | None = None,
) -> list[str]:
    """Caption a batch of images.

    Args:
        model: A stage-2 model (``Blip2Pretrainer(spec, stage=2)`` with trained weights loaded).
        tokenizer: The LLM's tokenizer (``pipeline.model.build_llm_tokenizer``).
        pixel_values: (B, 3, H, W) images normalised as in training.
        decoding: Greedy, beam search or sampling, length limit and prompt.
        synced_gpus: Keep decoding until every rank is done (needed when the model's parameters
            are partitioned across ranks, as under DeepSpeed ZeRO-3).
        seeds: One seed per image: each image is decoded on its own with torch seeded by its
            seed (sampling then depends on the image's seed only). None decodes the batch at once.

    Returns:
        ``B * num_return_sequences`` captions, image by image, special tokens removed and
        whitespace stripped.
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

    def decode(embeds: torch.Tensor) -> list[str]:  # (b, Q + P, D_llm) -> b * K captions
        output = model.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=device),  # (b, Q + P)
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=synced_gpus,
            **decoding.generate_kwargs(),
        )  # (b * K, T_new): with inputs_embeds only, decoder-only models return just the new tokens
        return [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]

    if seeds is None:
        return decode(inputs_embeds)
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for {batch} images")
    per_image = seeded_per_image(seeds, device, lambda i: decode(inputs_embeds[i : i + 1]))
    return [caption for captions in per_image for caption in captions]
