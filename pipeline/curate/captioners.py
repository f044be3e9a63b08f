"""Synthetic captions: K per image by nucleus sampling, from our stage-2 model (through its LLM),
our stage-1 model (its ITG head) or a transformers image-to-text model. Each image's captions are
sampled from a seed of (``captioner.seed``, its key) alone
(``pipeline.model.generate.SeededNucleusSampling``), so a rerun, or a run with other batches,
writes the same captions."""

from __future__ import annotations

import hashlib

import torch

from pipeline.curate.sources import PixelBatcher, decode_rgb, our_checkpoint, transformers_name
from pipeline.model.generate import DecodingSpec, generate_captions, generate_itg_captions
from pipeline.spec.curate import CaptionerSpec
from pipeline.spec.storage import StorageSpec


def image_seed(seed: int, key: str) -> int:
    """The sampling seed of the image ``key``."""
    digest = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def decoding_of(spec: CaptionerSpec) -> DecodingSpec:
    """Nucleus sampling of ``spec.captions`` captions per image."""
    return DecodingSpec(max_new_tokens=spec.max_new_tokens, prompt=spec.prompt, do_sample=True,
                        top_p=spec.top_p, temperature=spec.temperature, num_return_sequences=spec.captions)


class OwnCaptioner:
    """Captions with a checkpoint of this pipeline: of stage 2 through the frozen LLM (its
    Q-Former as the visual prompt), of stage 1 with the Q-Former's own image-grounded text
    decoder, the ITG head (BLIP's captioner is such a decoder); ``pipeline.model.generate``."""

    def __init__(self, checkpoint, spec: CaptionerSpec, device: torch.device):
        from pipeline.checkpoint.rebuild import load_trained_model
        from pipeline.model import build_llm_tokenizer, build_qformer_tokenizer, image_preprocessing

        self.spec, self.device = spec, device
        self.model = load_trained_model(checkpoint).to(device)
        if checkpoint.objective == 2:
            self.tokenizer = build_llm_tokenizer(checkpoint.model_spec.llm)
            self.generate = generate_captions
        else:
            self.tokenizer = build_qformer_tokenizer(checkpoint.model_spec.qformer)
            self.generate = generate_itg_captions
        self.pixels = PixelBatcher(image_preprocessing(checkpoint.model_spec.vision))
        self.decoding = decoding_of(spec)

    @torch.no_grad()
    def __call__(self, images: list[bytes], keys: list[str]) -> list[list[str]]:
        """K captions for each image (prepared JPEG bytes)."""
        pixel_values = self.pixels(images).to(self.device)  # (B, 3, S, S)
        seeds = [image_seed(self.spec.seed, key) for key in keys]
        flat = self.generate(self.model, self.tokenizer, pixel_values, self.decoding, seeds=seeds)
        k = self.spec.captions
        return [flat[i * k : (i + 1) * k] for i in range(len(images))]


class TransformersCaptioner:
    """Captions with a transformers image-to-text model: BLIP, BLIP-2, or anything
    ``AutoModelForImageTextToText`` loads, with its own processor."""

    def __init__(self, name: str, spec: CaptionerSpec, device: torch.device):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from pipeline.model.frozen import torch_dtype

        self.spec, self.device = spec, device
        path = transformers_name(name)
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype(spec.dtype)).to(device).eval()
        self.decoding = decoding_of(spec)

    @torch.no_grad()
    def __call__(self, images: list[bytes], keys: list[str]) -> list[list[str]]:
        """K captions for each image (prepared JPEG bytes)."""
        k = self.spec.captions
        inputs = self.processor(images=[decode_rgb(data) for data in images],
                                text=[self.spec.prompt] * len(images) if self.spec.prompt else None,
                                return_tensors="pt")
        rows = {name: value.repeat_interleave(k, dim=0).to(self.device) for name, value in inputs.items()
                if isinstance(value, torch.Tensor)}  # every input tensor, K rows per image
        if "pixel_values" in rows:
            rows["pixel_values"] = rows["pixel_values"].to(self.model.dtype)
        seeds = [image_seed(self.spec.seed, key) for key in keys]
        output = self.model.generate(**rows, **self.decoding.generate_kwargs(seeds))  # (B * K, T)
        texts = [_without_prompt(text, self.spec.prompt)
                 for text in self.processor.batch_decode(output, skip_special_tokens=True)]
        return [texts[i * k : (i + 1) * k] for i in range(len(images))]


def _without_prompt(text: str, prompt: str) -> str:
    text = text.strip()
    if prompt and text.lower().startswith(prompt.strip().lower()):
        text = text[len(prompt.strip()):]
    return text.strip()


def build_captioner(spec: CaptionerSpec, storage: StorageSpec, device: torch.device):
    """The captioner ``spec`` names.

    Raises:
        CheckpointError: an unusable checkpoint.
    """
    checkpoint = our_checkpoint(spec.model, spec.kind, spec.stage, storage, (1, 2), "captioner")
    if checkpoint is not None:
        return OwnCaptioner(checkpoint, spec, device)
    return TransformersCaptioner(spec.model, spec, device)
