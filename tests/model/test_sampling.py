"""Nucleus sampling of synthetic captions: tokens drawn by their probability inside the nucleus,
and an image's captions a function of its seed alone (not of the batch it is decoded in)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.assets import tiny_model_section
from pipeline.model import Blip2Pretrainer, build_llm_tokenizer
from pipeline.model import generate
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


def test_nucleus_sampling_of_a_flat_row_beside_peaked_rows_draws_from_its_whole_nucleus():
    """A flat distribution's nucleus is wider than the sampler's shortlist of likeliest tokens:
    those rows are sorted whole, the peaked rows of the same batch are not."""
    vocab = 1000
    flat = torch.linspace(2.0, 1.0, vocab).log()  # (V,) slowly decreasing probabilities
    peaked = torch.full((vocab,), -30.0)
    peaked[[7, 3]] = torch.tensor([1.0, 0.0])  # (V,) two tokens hold all the mass
    scores = torch.stack([flat, peaked] * 2000)  # (R, V), flat and peaked rows interleaved
    out = SeededNucleusSampling(range(4000), top_p=0.9, temperature=1.0)(torch.zeros(4000, 2, dtype=torch.long), scores)
    drawn = out.argmax(dim=1)  # (R,)
    probabilities = torch.softmax(flat.double(), dim=0)
    in_nucleus = int(((probabilities.cumsum(0) - probabilities) < 0.9).sum())  # the likeliest, in order
    flat_drawn = drawn[0::2]
    assert int(flat_drawn.max()) < in_nucleus and len(flat_drawn.unique()) > 3 * SeededNucleusSampling.SHORTLIST
    assert set(drawn[1::2].tolist()) == {3, 7}


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


def test_sampled_captions_are_the_same_with_the_shared_prompt_cache_as_without(captioner, monkeypatch):
    """Sampling runs each image's visual prompt through the LLM once and repeats its cache for
    the K rows: the captions must be those of K full prompts."""
    model, tokenizer = captioner
    torch.set_num_threads(1)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # (B, 3, S, S)
    decoding = DecodingSpec(do_sample=True, top_p=0.9, num_return_sequences=4, max_new_tokens=6)
    shared = generate_captions(model, tokenizer, images, decoding, seeds=[11, 22, 33])
    monkeypatch.setattr(generate, "_shared_prompt_cache", lambda *args: {})
    assert generate_captions(model, tokenizer, images, decoding, seeds=[11, 22, 33]) == shared
    assert len(set(shared)) > 4
