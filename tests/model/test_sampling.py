"""Nucleus sampling of synthetic captions: tokens drawn by their probability inside the nucleus,
and an image's captions a function of its seed alone (not of the batch it is decoded in)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.assets import tiny_model_section
from pipeline.model import Blip2Pretrainer, build_llm_tokenizer
from pipeline.model.generate import DecodingSpec, SeededNucleusSampling, generate_captions
from pipeline.spec.model import ModelSpec


def test_nucleus_sampling_draws_tokens_in_proportion_inside_the_nucleus():
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01])
    scores = probabilities.log().expand(4000, -1)  # (R, V)
    sampler = SeededNucleusSampling(range(4000), top_p=0.9, temperature=1.0)
    out = sampler(torch.zeros(4000, 3, dtype=torch.long), scores)  # (R, V): 0 at the token, -inf elsewhere
    assert torch.equal(torch.isfinite(out).sum(dim=1), torch.ones(4000, dtype=torch.long))
    counts = np.bincount(out.argmax(dim=1).numpy(), minlength=5) / 4000
    # The nucleus holding 0.9 is the first three tokens (0.5 + 0.3 < 0.9 <= 0.95), renormalised.
    assert np.allclose(counts[:3], [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95], atol=0.03), counts
    assert counts[3:].sum() == 0
    greedy = SeededNucleusSampling(range(50), top_p=0.01, temperature=1.0)(
        torch.zeros(50, 3, dtype=torch.long), scores[:50])
    assert (greedy.argmax(dim=1) == 0).all()
    # Another step draws anew; the same seed and step draw the same.
    again = sampler(torch.zeros(4000, 3, dtype=torch.long), scores)
    later = sampler(torch.zeros(4000, 4, dtype=torch.long), scores)
    assert torch.equal(again, out) and not torch.equal(later, out)


@pytest.fixture(scope="module")
def captioner():
    torch.manual_seed(0)
    spec = ModelSpec.model_validate(tiny_model_section(num_query_tokens=4, embed_dim=16))
    model = Blip2Pretrainer(spec, objective=2).eval()
    with torch.no_grad():  # a wide projection: the random LLM's next tokens then vary with the image
        model.language_projection.weight.normal_(0, 2.0)
    return model, build_llm_tokenizer(spec.llm)


def test_an_images_sampled_captions_depend_on_its_seed_not_on_its_batch(captioner):
    model, tokenizer = captioner
    torch.set_num_threads(1)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # (B, 3, S, S)
    decoding = DecodingSpec(do_sample=True, top_p=0.9, num_return_sequences=4, max_new_tokens=6)
    together = generate_captions(model, tokenizer, images, decoding, seeds=[11, 22, 33])
    assert len(together) == 12
    alone = generate_captions(model, tokenizer, images[1:2], decoding, seeds=[22])
    reversed_batch = generate_captions(model, tokenizer, images.flip(0), decoding, seeds=[33, 22, 11])
    assert alone == together[4:8] == reversed_batch[4:8]
    assert reversed_batch[:4] == together[8:]
    assert len(set(together)) > 4, "sampling should vary the captions"
    reseeded = generate_captions(model, tokenizer, images[1:2], decoding, seeds=[23])
    assert reseeded != alone
