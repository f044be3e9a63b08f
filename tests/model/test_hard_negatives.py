"""ITM hard negatives: never a pair whose caption is the same text as the positive's."""

from __future__ import annotations

import torch

from pipeline.model.losses import sample_hard_negatives


def test_same_caption_pairs_are_never_drawn_as_negatives():
    # Captions: 0 and 1 are the same text, 2 and 3 differ. The same text scores highest, as
    # identical captions do, so without the mask it would be drawn almost always.
    captions = torch.tensor([7, 7, 8, 9])
    same = captions[:, None] == captions[None, :]
    sim = torch.tensor([
        [5.0, 5.0, 0.0, 0.0],
        [5.0, 5.0, 0.0, 0.0],
        [0.0, 0.0, 5.0, 1.0],
        [0.0, 0.0, 1.0, 5.0],
    ])
    drawn_unmasked = []
    for seed in range(50):
        texts, images = sample_hard_negatives(sim, same, seed=seed)
        assert not same[torch.arange(4), texts].any() and not same[images, torch.arange(4)].any()
        drawn_unmasked.append(sample_hard_negatives(sim, seed=seed)[0][:2])
    # Without the mask images 0 and 1 draw each other's identical caption almost every time.
    assert sum(int((d == torch.tensor([1, 0])).all()) for d in drawn_unmasked) > 40


def test_a_batch_of_one_caption_falls_back_to_excluding_the_positive_only():
    same = torch.ones(3, 3, dtype=torch.bool)
    texts, images = sample_hard_negatives(torch.zeros(3, 3), same, seed=0)
    assert (texts != torch.arange(3)).all() and (images != torch.arange(3)).all()
