"""What a model computes per held-out batch for evaluation (the Ray Data actors and the in-training
hook both use these scorers; the metrics are computed afterwards from their outputs).

Both, per image: how alike its query outputs are (:func:`query_cosine`). Stage 1, per image: ITC scores against every gallery caption, its ITC top-k captions with their
ITM match logits (for BLIP-2's re-ranking), and the ITM logits of (image, its caption) and of
(image, its hardest wrong caption by ITC). Stage 2, per image: generated captions and the
caption's summed token negative log-likelihood under the frozen LLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.eval.heldout import CaptionGallery
from pipeline.model.blip2 import Blip2Pretrainer
from pipeline.model.generate import DecodingSpec, generate_captions
from pipeline.model.losses import IGNORE_INDEX, image_text_similarity

_GALLERY_CHUNK = 256


def query_cosine(query_output: torch.Tensor) -> torch.Tensor:
    """(B, Q, H) query outputs -> (B,) mean cosine similarity of each image's Q(Q-1) pairs of
    distinct queries: 1 when all Q queries give one vector (a collapsed visual prompt)."""
    unit = F.normalize(query_output.float(), dim=-1)  # (B, Q, H)
    cosines = unit @ unit.transpose(1, 2)  # (B, Q, Q)
    queries = cosines.shape[1]
    off_diagonal = cosines.sum(dim=(1, 2)) - cosines.diagonal(dim1=1, dim2=2).sum(dim=1)  # (B,)
    return off_diagonal / max(queries * (queries - 1), 1)


@dataclass(frozen=True)
class ScoringSpec:
    """How much work evaluation does per sample.

    Attributes:
        itm_top_k: ITC candidates per image re-scored by ITM (0: no ITM at all).
        decoding: Greedy decoding settings of the generated captions.
        beam_decoding: Beam search settings of a second set of captions, or None.
    """

    itm_top_k: int = 8
    decoding: DecodingSpec = DecodingSpec()
    beam_decoding: DecodingSpec | None = None


class Stage1Scorer:
    """Retrieval and matching outputs of a stage-1 model.

    Args:
        model: A stage-1 model in eval mode.
        gallery: The held-out set's distinct captions; their text features are computed here once.
        itm_top_k: Candidates per image scored by ITM (0: none, and no matching outputs).
    """

    def __init__(self, model: Blip2Pretrainer, gallery: CaptionGallery, itm_top_k: int):
        self.model, self.gallery, self.itm_top_k = model, gallery, itm_top_k
        self.gallery_ids = torch.as_tensor(gallery.input_ids)  # (C, T)
        self.gallery_mask = torch.as_tensor(gallery.attention_mask)  # (C, T)
        with torch.no_grad():
            self.gallery_feats = torch.cat([
                model.text_features(self.gallery_ids[i : i + _GALLERY_CHUNK],
                                    self.gallery_mask[i : i + _GALLERY_CHUNK])
                for i in range(0, len(gallery.captions), _GALLERY_CHUNK)
            ]).float()  # (C, E)

    @torch.no_grad()
    def __call__(self, inputs: dict[str, torch.Tensor], captions: list[str]) -> dict[str, np.ndarray]:
        """Score one batch.

        Args:
            inputs: ``pixel_values`` (B, 3, S, S) (caption tokens are taken from the gallery).
            captions: The B reference captions (each must be in the gallery).

        Returns:
            ``gallery_index`` (B,), ``itc`` (B, C), ``query_cosine`` (B,), and when ITM is on: ``candidates`` (B, k),
            ``candidate_match`` (B, k) match logits, ``positive_logits`` (B, 2),
            ``negative_index`` (B,) and ``negative_logits`` (B, 2).
        """
        model = self.model
        reference = torch.from_numpy(self.gallery.index_of(captions))  # (B,)
        image_embeds = model.encode_image(inputs["pixel_values"])  # (B, P, D)
        query_output = model.query_image(image_embeds)  # (B, Q, H)
        image_feats = model.image_features(query_output).float()  # (B, Q, E)
        itc = image_text_similarity(image_feats, self.gallery_feats)  # (B, C)
        out = {"gallery_index": reference.numpy(), "itc": itc.numpy(),
               "query_cosine": query_cosine(query_output).numpy()}
        if self.itm_top_k == 0:
            return out
        k = min(self.itm_top_k, itc.shape[1])
        candidates = itc.topk(k, dim=1).indices  # (B, k)
        wrong = itc.masked_fill(F.one_hot(reference, itc.shape[1]).bool(), float("-inf"))  # (B, C)
        negative = wrong.argmax(dim=1)  # (B,)
        captions_of_pairs = torch.cat([candidates, reference[:, None], negative[:, None]], dim=1)  # (B, k + 2)
        logits = self._match(image_embeds, captions_of_pairs)  # (B, k + 2, 2)
        out.update(
            candidates=candidates.numpy(),
            candidate_match=logits[:, :k, 1].numpy(),
            positive_logits=logits[:, k].numpy(),
            negative_index=negative.numpy(),
            negative_logits=logits[:, k + 1].numpy(),
        )
        return out

    def _match(self, image_embeds: torch.Tensor, caption_index: torch.Tensor) -> torch.Tensor:
        """ITM logits of each image with each of its captions: (B, P, D), (B, n) -> (B, n, 2)."""
        batch, pairs = caption_index.shape
        images = image_embeds.repeat_interleave(pairs, dim=0)  # (B * n, P, D)
        flat = caption_index.reshape(-1)  # (B * n,)
        logits = self.model.match_logits(images, self.gallery_ids[flat], self.gallery_mask[flat])
        return logits.float().reshape(batch, pairs, 2)


class Stage2Scorer:
    """Captioning outputs of a stage-2 model.

    Args:
        model: A stage-2 model in eval mode.
        tokenizer: The LLM's tokenizer.
        spec: Decoding settings.
        synced_gpus: Passed to generation (ranks of a ZeRO-3 model decode in lockstep).
    """

    def __init__(self, model: Blip2Pretrainer, tokenizer, spec: ScoringSpec, *, synced_gpus: bool = False):
        self.model, self.tokenizer, self.spec, self.synced_gpus = model, tokenizer, spec, synced_gpus

    @torch.no_grad()
    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Score one batch.

        Args:
            inputs: ``pixel_values`` (B, 3, S, S), ``llm_input_ids`` and ``llm_attention_mask`` (B, L).

        Returns:
            ``generated`` (B,) captions, ``beam_generated`` (B,) when beam search is on,
            ``nll_sum`` (B,) summed caption token negative log-likelihoods, ``tokens`` (B,),
            ``query_cosine`` (B,).
        """
        model, spec = self.model, self.spec
        out = model.forward_stage2(**inputs)
        labels = model.language_model_labels(
            inputs["llm_input_ids"], inputs["llm_attention_mask"]
        )[:, 1:]  # (B, Q + L - 1): the next token of every position
        nll = F.cross_entropy(
            out.logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )  # (B, Q + L - 1)
        result = {
            "nll_sum": nll.sum(dim=1).numpy().astype(np.float64),
            "tokens": (labels != IGNORE_INDEX).sum(dim=1).numpy(),
            "query_cosine": query_cosine(out.query_output).numpy(),
            "generated": np.array(self._generate(inputs, spec.decoding), dtype=object),
        }
        if spec.beam_decoding is not None:
            result["beam_generated"] = np.array(self._generate(inputs, spec.beam_decoding), dtype=object)
        return result

    def _generate(self, inputs: dict[str, torch.Tensor], decoding: DecodingSpec) -> list[str]:
        return generate_captions(self.model, self.tokenizer, inputs["pixel_values"], decoding,
                                 synced_gpus=self.synced_gpus)
