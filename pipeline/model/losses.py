"""The BLIP-2 pretraining losses, as functions of already computed features.

Distributed conventions (see ``pipeline.model.distributed``): each rank passes its local rows
and the gathered ("all") tensors; rank ``r``'s positives sit at ``r * B + arange(B)`` of the
gathered batch. Per-rank losses are means over local rows, so their mean over ranks is the loss
of one process on the concatenated batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label of positions that carry no loss."""


def image_text_similarity(
    image_feats: torch.Tensor, text_feats: torch.Tensor, *, text_major: bool = False
) -> torch.Tensor:
    """BLIP-2's image-text similarity: the best query's cosine similarity with the caption.

    Args:
        image_feats: (N, Q, E) L2-normalised query features of N images.
        text_feats: (M, E) L2-normalised ``[CLS]`` features of M captions.
        text_major: Return the (M, N) transpose, computed text-major (its backward sums in
            another order than a transposed (N, M) result's: runs of earlier versions stay
            bitwise reproducible).

    Returns:
        (N, M) similarities, or (M, N) when ``text_major``.
    """
    if text_major:
        return torch.einsum("me,nqe->mnq", text_feats, image_feats).amax(dim=2)  # (M, N)
    return torch.einsum("nqe,me->nqm", image_feats, text_feats).amax(dim=1)  # (N, M)


@dataclass(frozen=True)
class ContrastiveResult:
    """The image-text contrastive loss and its similarity logits.

    Attributes:
        loss: () mean of the image-to-text and text-to-image cross-entropies.
        sim_i2t: (B, N) local images against all N gathered captions, divided by the temperature;
            each entry is the maximum over the image's query features.
        sim_t2i: (B, N) local captions against all N gathered images, likewise.
    """

    loss: torch.Tensor
    sim_i2t: torch.Tensor
    sim_t2i: torch.Tensor


def contrastive_loss(
    image_feats: torch.Tensor,
    text_feat: torch.Tensor,
    image_feats_all: torch.Tensor,
    text_feat_all: torch.Tensor,
    temperature: torch.Tensor,
    *,
    rank: int,
    label_smoothing: float,
) -> ContrastiveResult:
    """Image-text contrastive (ITC) loss with the max-over-queries similarity of BLIP-2.

    Args:
        image_feats: (B, Q, E) L2-normalised query features of the local images.
        text_feat: (B, E) L2-normalised ``[CLS]`` features of the local captions.
        image_feats_all: (N, Q, E) query features gathered from all ranks.
        text_feat_all: (N, E) caption features gathered from all ranks.
        temperature: (1,) or () the (clamped) learnable temperature.
        rank: This process's rank; its rows start at ``rank * B`` of the gathered batch.
        label_smoothing: Label smoothing of both cross-entropies.
    """
    batch = image_feats.shape[0]
    # In fp32: at temperature 0.07, bf16 similarities would be quantised to steps of ~0.03.
    image_feats, text_feat = image_feats.float(), text_feat.float()
    image_feats_all, text_feat_all = image_feats_all.float(), text_feat_all.float()
    sim_i2t = image_text_similarity(image_feats, text_feat_all) / temperature.float()  # (B, N)
    sim_t2i = image_text_similarity(image_feats_all, text_feat, text_major=True) / temperature.float()  # (B, N)
    targets = rank * batch + torch.arange(batch, device=image_feats.device)  # (B,)
    loss = (
        F.cross_entropy(sim_i2t.float(), targets, label_smoothing=label_smoothing)
        + F.cross_entropy(sim_t2i.float(), targets, label_smoothing=label_smoothing)
    ) / 2
    return ContrastiveResult(loss=loss, sim_i2t=sim_i2t, sim_t2i=sim_t2i)


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t_all: torch.Tensor, same_caption: torch.Tensor | None = None, *, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one ITM negative caption per image and one negative image per caption.

    Every rank samples over the *whole* gathered (N, N) similarity matrix with a generator seeded
    by ``seed`` (pass the same on every rank), then keeps its own rows: all ranks, and one process
    holding the concatenated batch, draw the same negatives.

    The probability of a candidate is the softmax of its similarity over the row, with the
    positive pairs excluded, as in LAVIS (which, given image ids, also excludes every pair of the
    same image). Corpora where many images share a caption would otherwise draw mostly
    "negatives" that are true matches: the same caption scores like the positive.

    Args:
        sim_i2t_all: (N, N) image-to-text similarity logits of the gathered batch, image ``i``'s
            positive caption at column ``i``.
        same_caption: (N, N) bool, True where captions ``i`` and ``j`` are the same text, also
            excluded; a row left without candidates excludes only its diagonal.
        seed: Seeds the draws.

    Returns:
        ``(negative_text_of_image, negative_image_of_text)``, each (N,) indices into the
        gathered batch.

    Raises:
        ValueError: The gathered batch has fewer than two pairs (no negative exists).
    """
    size = sim_i2t_all.shape[0]
    if size < 2:
        raise ValueError("ITM hard negatives need 2 or more pairs in the gathered batch")
    positives = torch.eye(size, dtype=torch.bool, device=sim_i2t_all.device)  # (N, N)
    if same_caption is not None:
        only_matches = (same_caption | positives).all(dim=1, keepdim=True)  # (N, 1)
        positives = torch.where(only_matches, positives, same_caption | positives)
    sim = sim_i2t_all.float().masked_fill(positives, float("-inf"))  # (N, N)
    generator = torch.Generator(device=sim.device).manual_seed(seed)
    negative_texts = torch.multinomial(sim.softmax(dim=1), 1, generator=generator)  # (N, 1)
    negative_images = torch.multinomial(sim.t().softmax(dim=1), 1, generator=generator)
    return negative_texts.squeeze(1), negative_images.squeeze(1)


def matching_loss(itm_logits: torch.Tensor) -> torch.Tensor:
    """Image-text matching (ITM) cross-entropy over a batch laid out as BLIP-2 does.

    Args:
        itm_logits: (3B, 2) logits of (positive image, positive caption) for the first B rows,
            then (negative image, positive caption), then (positive image, negative caption).

    Returns:
        () mean cross-entropy with labels 1 for the first B rows and 0 for the other 2B.
    """
    batch = itm_logits.shape[0] // 3
    labels = torch.zeros(3 * batch, dtype=torch.long, device=itm_logits.device)
    labels[:batch] = 1
    return F.cross_entropy(itm_logits.float(), labels)


def generation_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    label_smoothing: float,
) -> torch.Tensor:
    """Image-grounded text generation (ITG) loss: shifted next-token cross-entropy.

    Args:
        logits: (B, T, V) logits at each caption position (the first position holds ``[DEC]``).
        input_ids: (B, T) caption ids.
        attention_mask: (B, T) 1 for tokens, 0 for padding (padding carries no loss).
        label_smoothing: Label smoothing of the cross-entropy.

    Returns:
        () mean over the predicted (non-padding) tokens.
    """
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)[:, 1:]  # (B, T-1)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels.flatten(),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


def language_model_labels(
    llm_input_ids: torch.Tensor,
    llm_attention_mask: torch.Tensor,
    num_queries: int,
    prompt_lengths: torch.Tensor | None = None,
    *,
    bos_token_id: int | None = None,
) -> torch.Tensor:
    """Labels of the stage-2 LLM input ``[query slots] + caption``, unshifted.

    Args:
        llm_input_ids: (B, T) LLM token ids of (begin-of-text +) (prompt +) caption + eos,
            right-padded.
        llm_attention_mask: (B, T) 1 for tokens, 0 for padding.
        num_queries: Number Q of visual prompt slots placed before the tokens.
        prompt_lengths: (B,) number of leading prompt tokens per row, or ``None``.
        bos_token_id: The LLM's begin-of-text token: where a row starts with it, it is input
            only. Asking the LLM to predict it after the visual prompt (to start a new document
            there) slowed stage 2 down several-fold.

    Returns:
        (B, Q + T) the token ids, with :data:`IGNORE_INDEX` on query slots, a leading
        begin-of-text, the prompt and padding.
    """
    labels = llm_input_ids.masked_fill(llm_attention_mask == 0, IGNORE_INDEX)  # (B, T)
    if bos_token_id is not None:
        labels[:, 0] = labels[:, 0].masked_fill(labels[:, 0] == bos_token_id, IGNORE_INDEX)
    if prompt_lengths is not None:
        positions = torch.arange(labels.shape[1], device=labels.device)  # (T,)
        in_prompt = positions[None, :] < prompt_lengths.to(labels.device)[:, None]  # (B, T)
        labels = labels.masked_fill(in_prompt, IGNORE_INDEX)
    query_slots = labels.new_full((labels.shape[0], num_queries), IGNORE_INDEX)  # (B, Q)
    return torch.cat([query_slots, labels], dim=1)
