"""Caption generation, by a stage-2 model through the frozen LLM or by a stage-1 model's own
image-grounded text decoder.

Stage 2, as in BLIP-2 (LAVIS ``blip2_opt.generate``): the projected query outputs come first, then
the LLM's own leading special tokens and an optional text prompt, exactly as the training captions
were tokenized (``pipeline.data.tokenize``); the LLM continues greedily or with beam search until
its end-of-text token, or samples several captions per image (nucleus sampling, as BLIP's
CapFilt). Decoding runs through transformers' ``generate(inputs_embeds=...)``.

Stage 1: the Q-Former's ITG head reads ``[DEC]`` and the caption so far while its queries see the
image (BLIP's captioner is such a decoder), greedily or by the same nucleus sampling.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

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

    def generate_kwargs(self, seeds: Sequence[int] | None = None) -> dict:
        """The matching keyword arguments of transformers' ``generate``.

        Args:
            seeds: When sampling, one seed per input row: the inputs must then be repeated
                ``num_return_sequences`` times (row-major, see :func:`sampled_rows`), and each
                row is sampled by :class:`SeededNucleusSampling` from its own seed.
        """
        kwargs = {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens,
                  "length_penalty": self.length_penalty, "do_sample": self.do_sample,
                  "num_return_sequences": self.num_return_sequences}
        if self.do_sample and seeds is not None:
            kwargs.update(do_sample=False, num_return_sequences=1, logits_processor=LogitsProcessorList(
                [SeededNucleusSampling(sampled_rows(seeds, self.num_return_sequences), self.top_p, self.temperature)]))
        elif self.do_sample:
            kwargs.update(top_p=self.top_p, temperature=self.temperature, top_k=0)
        return kwargs


def sampled_rows(seeds: Sequence[int], per_seed: int) -> list[int]:
    """The seeds of ``per_seed`` sampled sequences of each input seed, input by input."""
    return [_hash_int(f"{seed}/{k}") for seed in seeds for k in range(per_seed)]


def _hash_int(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class SeededNucleusSampling(LogitsProcessor):
    """Nucleus (top-p) sampling in which the token of row ``r`` at each step depends only on
    ``seeds[r]``, the step and the row's own distribution: the scores it returns are ``-inf``
    everywhere but at the sampled token, which greedy decoding then takes. A batch decodes each
    row as it would alone, whatever else is in the batch (torch's global generator would not).

    Args:
        seeds: One seed per row of the batch ``generate`` decodes.
        top_p: Sample among the likeliest tokens holding this much probability.
        temperature: Softmax temperature.
    """

    SHORTLIST = 64

    def __init__(self, seeds: Sequence[int], top_p: float, temperature: float):
        self.seeds, self.top_p, self.temperature = list(seeds), top_p, temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"{scores.shape[0]} rows to sample, {len(self.seeds)} seeds")
        step = input_ids.shape[1]
        draws = torch.tensor([_hash_int(f"{seed}@{step}") / 2.0**64 for seed in self.seeds],
                             dtype=torch.float64, device=scores.device)  # (R,) uniform in [0, 1)
        probs = torch.softmax(scores.double() / self.temperature, dim=-1)  # (R, V)
        # Sorting the whole vocabulary of every row was a third of captioning's time: rows whose
        # SHORTLIST likeliest tokens hold top_p have their nucleus inside them.
        shortlist = probs.topk(min(self.SHORTLIST, probs.shape[-1]), dim=-1)  # (R, N) each, descending
        short = shortlist.values.sum(dim=-1) >= self.top_p  # (R,)
        token = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)  # (R,)
        token[short] = self._draw(shortlist.values[short], shortlist.indices[short], draws[short])
        if not bool(short.all()):
            ordered = probs[~short].sort(dim=-1, descending=True)  # (R', V) each
            token[~short] = self._draw(ordered.values, ordered.indices, draws[~short])
        return torch.full_like(scores, float("-inf")).scatter_(-1, token[:, None], 0.0)

    def _draw(self, sorted_probs: torch.Tensor, order: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """The token each row's draw picks in its nucleus, from its probabilities in descending
        order (R, N), their token ids (R, N) and its uniform draw (R,)."""
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (R, N) mass of the likelier tokens
        nucleus = torch.where(before < self.top_p, sorted_probs, 0.0)  # (R, N), first token always in
        cumulative = nucleus.cumsum(dim=-1)  # (R, N)
        target = draws[:, None] * cumulative[:, -1:]  # (R, 1)
        pick = (cumulative <= target).sum(dim=-1, keepdim=True).clamp(max=sorted_probs.shape[-1] - 1)  # (R, 1)
        return order.gather(-1, pick).squeeze(-1)  # (R,)


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
        seeds: When sampling, one seed per image: an image's captions then depend on its seed
            alone, not on the batch (see :class:`SeededNucleusSampling`). None samples with
            torch's global generator.

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

    rows, shared = inputs_embeds, {}
    if seeds is not None:
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for {batch} images")
        if decoding.do_sample:
            rows = inputs_embeds.repeat_interleave(decoding.num_return_sequences, dim=0)  # (B * K, Q + P, D_llm)
            shared = _shared_prompt_cache(model.language_model, inputs_embeds, decoding.num_return_sequences)
    output = model.language_model.generate(
        inputs_embeds=rows,
        attention_mask=torch.ones(rows.shape[:2], dtype=torch.long, device=device),  # (B * K, Q + P)
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        synced_gpus=synced_gpus,
        **shared,
        **decoding.generate_kwargs(seeds),
    )  # (B * K, T_new): with inputs_embeds only, decoder-only models return just the new tokens
    return [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]


def _shared_prompt_cache(language_model, inputs_embeds: torch.Tensor, copies: int) -> dict:
    """``generate``'s ``past_key_values`` for ``copies`` rows per image: the prompt but its last
    position runs through the LLM once per image and the cache is repeated, instead of once per
    sampled caption (that repeated prefill was a quarter of captioning's time at K = 5).
    ``generate`` then runs only the prompt's last position and the new tokens."""
    if copies == 1 or inputs_embeds.shape[1] < 2:
        return {}
    cache = DynamicCache(config=language_model.config)
    language_model(inputs_embeds=inputs_embeds[:, :-1], past_key_values=cache, use_cache=True,
                   attention_mask=torch.ones(inputs_embeds.shape[:2], dtype=torch.long,
                                             device=inputs_embeds.device)[:, :-1],
                   logits_to_keep=1)  # fills the cache: (B, Q + P - 1) positions
    cache.batch_repeat_interleave(copies)  # (B * K, Q + P - 1) positions
    return {"past_key_values": cache}


@torch.no_grad()
def generate_itg_captions(
    model: Blip2Pretrainer,
    tokenizer: PreTrainedTokenizerBase,
    pixel_values: torch.Tensor,
    decoding: DecodingSpec = DecodingSpec(),
    *,
    seeds: Sequence[int] | None = None,
) -> list[str]:
    """Caption a batch of images with a stage-1 model's image-grounded text decoder (ITG head).

    transformers' ``generate`` needs a ``GenerationMixin`` model, and this decoder is the
    Q-Former under a UniLM mask, so the loop is here: each step runs the whole caption so far
    (at most ``max_new_tokens`` tokens after ``[DEC]``) and stops at ``[SEP]``.

    Args:
        model: A stage-1 model (``Blip2Pretrainer(spec, objective=1)`` with trained weights).
        tokenizer: The Q-Former's tokenizer (``pipeline.model.build_qformer_tokenizer``).
        pixel_values: (B, 3, H, W) images normalised as in training.
        decoding: Greedy or nucleus sampling (no beam search), length limit and prompt.
        seeds: When sampling, one seed per image, as for :func:`generate_captions` (None draws
            them from torch's global generator).

    Returns:
        ``B * num_return_sequences`` captions, image by image, the prompt removed.
    """
    if model.objective != 1:
        raise ValueError("ITG captioning needs a model of objective 1 (one with the ITG head)")
    if decoding.num_beams != 1:
        raise ValueError("ITG captioning is greedy or sampled, not beam search")
    copies = decoding.num_return_sequences if decoding.do_sample else 1
    image_embeds = model.encode_image(pixel_values)  # (B, P, D)
    device = image_embeds.device
    image_of_row = torch.arange(image_embeds.shape[0], device=device).repeat_interleave(copies)  # (R,), R = B * K
    prompt = tokenizer(decoding.prompt, add_special_tokens=False)["input_ids"] if decoding.prompt else []
    ids = torch.tensor([tokenizer.cls_token_id] + prompt, device=device).repeat(len(image_of_row), 1)  # (R, 1 + P)
    sampler = None
    if decoding.do_sample:
        if seeds is None:
            seeds = torch.randint(2**62, (pixel_values.shape[0],)).tolist()
        sampler = SeededNucleusSampling(sampled_rows(seeds, copies), decoding.top_p, decoding.temperature)
    finished = torch.zeros(len(image_of_row), dtype=torch.bool, device=device)  # (R,)
    for _ in range(decoding.max_new_tokens):
        # The K rows of an image mostly share their prefix (all of it at the first steps): each
        # distinct (image, prefix) runs once (5 captions per image: 8.8 -> 12.3 images/s on 2 threads).
        distinct, row_of = torch.unique(torch.cat([image_of_row[:, None], ids], dim=1), dim=0,
                                        return_inverse=True)  # (U, 1 + T), (R,)
        scores = model.next_token_logits(image_embeds[distinct[:, 0]], distinct[:, 1:]).float()[row_of]  # (R, V)
        scores[finished] = -torch.inf  # a finished row writes padding; its (flat) nucleus is not drawn from
        scores[finished, tokenizer.pad_token_id] = 0.0
        if sampler is not None:
            scores = sampler(ids, scores)  # (R, V): 0 at the drawn token, -inf elsewhere
        token = scores.argmax(dim=-1)  # (R,)
        ids = torch.cat([ids, token[:, None]], dim=1)  # (R, T + 1)
        finished |= token == tokenizer.sep_token_id
        if bool(finished.all()):
            break
    captions = ids[:, 1 + len(prompt):]  # (R, T_new)
    return [text.strip() for text in tokenizer.batch_decode(captions, skip_special_tokens=True)]
