"""Image-text scores of candidate captions: from our stage-1 model (ITC, BLIP-2's best-query
cosine, or the ITM match probability) or from a transformers CLIP or SigLIP model (the cosine of
its image and text embeddings)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.curate.sources import PixelBatcher, decode_rgb, our_checkpoint, transformers_name
from pipeline.spec.curate import RankerSpec
from pipeline.spec.storage import StorageSpec

_TEXT_CHUNK = 256


class OwnRanker:
    """Scores with a stage-1 checkpoint of this pipeline."""

    def __init__(self, checkpoint, spec: RankerSpec, device: torch.device):
        from pipeline.checkpoint.rebuild import load_trained_model
        from pipeline.data.tokenize import CaptionTokenizer
        from pipeline.model import image_preprocessing
        from pipeline.spec.prep import TokenizerSpec

        model_spec = checkpoint.model_spec
        self.spec, self.device = spec, device
        self.model = load_trained_model(checkpoint).to(device)
        qformer = model_spec.qformer
        self.tokenizer = CaptionTokenizer(
            TokenizerSpec(name=qformer.tokenizer or qformer.bert, max_length=qformer.max_text_length),
            append_eos=False)
        self.pixels = PixelBatcher(image_preprocessing(model_spec.vision))

    @torch.no_grad()
    def __call__(self, images: list[bytes], candidates: list[list[str]]) -> list[np.ndarray]:
        """Each image's candidates' scores ((C_i,) float32 arrays)."""
        from pipeline.model.losses import image_text_similarity

        model = self.model
        flat = [text for texts in candidates for text in texts]
        owner = torch.tensor([i for i, texts in enumerate(candidates) for _ in texts], device=self.device)  # (C,)
        tokens = self.tokenizer(flat)
        ids = torch.from_numpy(tokens.input_ids.astype(np.int64)).to(self.device)  # (C, T)
        mask = torch.from_numpy(tokens.attention_mask.astype(np.int64)).to(self.device)  # (C, T)
        image_embeds = model.encode_image(self.pixels(images).to(self.device))  # (B, P, D)
        if self.spec.score == "itm":
            scores = torch.cat([
                model.match_logits(image_embeds[owner[i : i + _TEXT_CHUNK]], ids[i : i + _TEXT_CHUNK],
                                   mask[i : i + _TEXT_CHUNK]).float().softmax(dim=-1)[:, 1]
                for i in range(0, len(flat), _TEXT_CHUNK)])  # (C,)
        else:
            image_feats = model.image_features(model.query_image(image_embeds)).float()  # (B, Q, E)
            text_feats = torch.cat([model.text_features(ids[i : i + _TEXT_CHUNK], mask[i : i + _TEXT_CHUNK])
                                    for i in range(0, len(flat), _TEXT_CHUNK)]).float()  # (C, E)
            similarity = image_text_similarity(image_feats, text_feats)  # (B, C)
            scores = similarity[owner, torch.arange(len(flat), device=self.device)]  # (C,)
        return _split(scores.cpu().numpy().astype(np.float32), candidates)


class TransformersRanker:
    """Scores with a transformers dual encoder (CLIP, SigLIP, ...): embedding cosine similarity."""

    def __init__(self, name: str, spec: RankerSpec, device: torch.device):
        from transformers import AutoModel, AutoProcessor

        from pipeline.model.frozen import torch_dtype

        path = transformers_name(name)
        self.spec, self.device = spec, device
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch_dtype(spec.dtype)).to(device).eval()
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise ValueError(f"{name}: {type(self.model).__name__} has no image and text embeddings "
                             "(a ranker needs a CLIP- or SigLIP-like model)")

    @torch.no_grad()
    def __call__(self, images: list[bytes], candidates: list[list[str]]) -> list[np.ndarray]:
        """Each image's candidates' scores ((C_i,) float32 arrays)."""
        flat = [text for texts in candidates for text in texts]
        pixel = self.processor(images=[decode_rgb(data) for data in images], return_tensors="pt")
        image_feats = _embedding(self.model.get_image_features(
            pixel_values=pixel["pixel_values"].to(self.device, self.model.dtype)))  # (B, E)
        text_feats = []
        for i in range(0, len(flat), _TEXT_CHUNK):
            text = self.processor(text=flat[i : i + _TEXT_CHUNK], padding="max_length", truncation=True,
                                  return_tensors="pt").to(self.device)
            text_feats.append(_embedding(self.model.get_text_features(
                **{k: v for k, v in text.items() if k in ("input_ids", "attention_mask")})))
        owner = torch.tensor([i for i, texts in enumerate(candidates) for _ in texts], device=self.device)  # (C,)
        scores = (image_feats[owner] * torch.cat(text_feats)).sum(dim=-1)  # (C,) cosine
        return _split(scores.cpu().numpy().astype(np.float32), candidates)


def _embedding(output) -> torch.Tensor:
    """L2-normalised (N, E) features from ``get_*_features`` (a tensor, or an output's pooler)."""
    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    return F.normalize(features.float(), dim=-1)


def _split(scores: np.ndarray, candidates: list[list[str]]) -> list[np.ndarray]:
    ends = np.cumsum([len(texts) for texts in candidates])
    return np.split(scores, ends[:-1])


def build_ranker(spec: RankerSpec, storage: StorageSpec, device: torch.device):
    """The ranker ``spec`` names.

    Raises:
        CurateModelError: a checkpoint that is not of stage 1.
        CheckpointError: an unusable checkpoint.
    """
    checkpoint = our_checkpoint(spec.model, spec.kind, spec.stage, storage, (1,), "ranker")
    if checkpoint is not None:
        return OwnRanker(checkpoint, spec, device)
    return TransformersRanker(spec.model, spec, device)
