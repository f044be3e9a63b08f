"""Captioners and rankers: our own checkpoints and transformers BLIP / CLIP / SigLIP models, each
scoring every image against its own candidates and captioning each image from its seed alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.curate.captioners import build_captioner
from pipeline.curate.rankers import build_ranker
from pipeline.curate.sources import CurateModelError
from pipeline.spec.curate import CaptionerSpec, RankerSpec
from pipeline.spec.storage import StorageSpec
from tests.curate.helpers import save_tiny_blip, save_tiny_clip, save_tiny_siglip, write_checkpoint
from tests.helpers import one_thread  # noqa: F401 (autouse)

CPU = torch.device("cpu")
STORAGE = StorageSpec()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate-models")
    return {
        "stage1": write_checkpoint(root / "run" / "stage1" / "step-00000003", "unused", 0).parent,
        "stage2": write_checkpoint(root / "run" / "stage2" / "step-00000003", "unused", 1),
        "blip": save_tiny_blip(root / "blip"), "clip": save_tiny_clip(root / "clip"),
        "siglip": save_tiny_siglip(root / "siglip"),
    }


def images(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        encoded = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(encoded, format="JPEG")
        out.append(encoded.getvalue())
    return out


CANDIDATES = [["a red circle", "a blue circle"], ["a teal triangle"], ["a gray rectangle", "a red circle", "a black circle"]]


@pytest.mark.parametrize("kind", ["stage1-itc", "stage1-itm", "clip", "siglip"])
def test_each_image_is_scored_against_its_own_candidates(models, kind):
    name, _, score = kind.partition("-")
    ranker = build_ranker(RankerSpec(model=str(models[name]), score=score or "itc"), STORAGE, CPU)
    data = images(3)
    together = ranker(data, CANDIDATES)
    assert [len(s) for s in together] == [2, 1, 3]
    for index in range(3):  # the same scores when each image is scored alone
        alone = ranker([data[index]], [CANDIDATES[index]])[0]
        assert np.allclose(alone, together[index], atol=1e-5)
    assert not np.allclose(together[0][1], together[2][1]), "the same caption scores differently on other images"
    if score == "itm":
        assert all(((s > 0) & (s < 1)).all() for s in together)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_a_transformers_rankers_score_is_the_cosine_of_its_embeddings(models, name):
    from transformers import AutoModel, AutoProcessor

    ranker = build_ranker(RankerSpec(model=str(models[name])), STORAGE, CPU)
    data = images(1)
    got = ranker(data, [CANDIDATES[2]])[0]
    model, processor = AutoModel.from_pretrained(models[name]), AutoProcessor.from_pretrained(models[name])
    inputs = processor(text=CANDIDATES[2], images=[Image.open(io.BytesIO(data[0])).convert("RGB")],
                       padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    logits = out.logits_per_image[0]  # scale * cosine (+ bias for SigLIP)
    bias = model.logit_bias if name == "siglip" else 0.0
    cosine = ((logits - bias) / model.logit_scale.exp()).detach()
    assert np.allclose(got, cosine.numpy(), atol=1e-5)


@pytest.mark.parametrize("name", ["stage2", "stage1", "blip"])
def test_captioners_sample_k_captions_per_image_from_its_key_alone(models, name):
    spec = CaptionerSpec(model=str(models[name]), captions=3, max_new_tokens=5, seed=4)
    captioner = build_captioner(spec, STORAGE, CPU)
    data = images(3)
    together = captioner(data, ["k0", "k1", "k2"])
    assert [len(c) for c in together] == [3, 3, 3]
    assert captioner([data[1]], ["k1"]) == [together[1]]
    assert captioner(data[::-1], ["k2", "k1", "k0"])[::-1] == together
    assert len({c for captions in together for c in captions}) > 3
    reseeded = build_captioner(spec.model_copy(update={"seed": 5}), STORAGE, CPU)
    assert reseeded([data[1]], ["k1"]) != [together[1]]


def test_a_captioner_prompt_is_removed_from_its_captions(models):
    spec = CaptionerSpec(model=str(models["blip"]), captions=2, max_new_tokens=4, prompt="a photo of")
    captions = build_captioner(spec, STORAGE, CPU)(images(2), ["k0", "k1"])
    assert all(not c.startswith("a photo of") for group in captions for c in group)


def test_a_stage1_captioner_samples_with_its_itg_head_and_a_tiny_nucleus_is_its_greedy_caption(models):
    from pipeline.model.generate import DecodingSpec, generate_itg_captions

    spec = CaptionerSpec(model=str(models["stage1"]), captions=3, max_new_tokens=5, top_p=1e-9)
    captioner = build_captioner(spec, STORAGE, CPU)
    data = images(2)
    pixel_values = captioner.pixels(data)  # (B, 3, S, S)
    greedy = generate_itg_captions(captioner.model, captioner.tokenizer, pixel_values, DecodingSpec(max_new_tokens=5))
    assert captioner(data, ["k0", "k1"]) == [[greedy[0]] * 3, [greedy[1]] * 3]
    assert all(greedy), "the random ITG head should write some tokens"


def test_a_checkpoint_of_the_wrong_stage_is_one_clear_error(models):
    with pytest.raises(CurateModelError, match="ranker needs one of stage 1"):
        build_ranker(RankerSpec(model=str(models["stage2"]), kind="checkpoint"), STORAGE, CPU)
