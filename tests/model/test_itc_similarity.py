"""BLIP-2's image-text similarity: the best query's cosine similarity, in either layout."""

from __future__ import annotations

import torch

from pipeline.model.losses import image_text_similarity


def test_similarity_takes_the_best_query_in_both_layouts():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(7, 4, 5, generator=generator)
    texts = torch.randn(3, 5, generator=generator)
    brute = torch.tensor([[max(float(q @ t) for q in image) for t in texts] for image in images])
    torch.testing.assert_close(image_text_similarity(images, texts), brute)
    torch.testing.assert_close(image_text_similarity(images, texts, text_major=True), brute.t())
