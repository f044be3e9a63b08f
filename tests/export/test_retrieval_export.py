"""A stage-1 checkpoint exported as transformers' Blip2ForImageTextRetrieval computes what ours does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Blip2ForImageTextRetrieval, Blip2Processor

from pipeline.data.tokenize import CaptionTokenizer
from pipeline.export import export_checkpoint
from pipeline.model import image_preprocessing
from pipeline.spec.prep import TokenizerSpec

from tests.export.helpers import captions, model_section, square_images, train_and_checkpoint

QUERIES, TEXT_LENGTH = 4, 12


@pytest.fixture(scope="module")
def stage1(towers, tmp_path_factory):
    """A trained stage-1 model (Blip2VisionModel tower) and its transformers export."""
    run = tmp_path_factory.mktemp("runs") / "retrieval"
    trained = train_and_checkpoint(run, model_section(towers.blip2_vision, towers.bert, towers.llm), objective=1)
    result = export_checkpoint(str(trained.checkpoint), tmp_path_factory.mktemp("export") / "stage1")
    exported = Blip2ForImageTextRetrieval.from_pretrained(result.out_dir).eval()
    return trained.model, result, exported, Blip2Processor.from_pretrained(result.out_dir)


def _inputs(processor, count: int, seed: int):
    return processor(images=square_images(count, seed), text=captions(count, seed + 1),
                     padding="max_length", max_length=QUERIES + TEXT_LENGTH, return_tensors="pt")


def test_stage1_is_written_as_a_retrieval_model_folder(stage1):
    model, result, exported, _ = stage1
    record = result.record
    assert record["format"] == "transformers" and result.blockers == []
    assert record["transformers_class"] == "Blip2ForImageTextRetrieval"
    files = {path.name for path in result.out_dir.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer_config.json",
            "README.md", "qformer_export.json", "qformer_pretraining.safetensors"} <= files
    assert json.loads((result.out_dir / "qformer_export.json").read_text()) == record
    assert exported.config.num_query_tokens == QUERIES and exported.config.image_text_hidden_size == 16
    assert exported.config.qformer_config.use_qformer_text_input
    assert exported.config.vision_config.num_hidden_layers == 2  # drop_last_layer: 3 -> 2
    # The pretraining-only parts are kept beside the model (under our names), the temperature
    # also recorded.
    pretraining_only = sorted(["temp", *(name for name, _ in model.named_parameters() if name.startswith("lm_head."))])
    assert record["pretraining_only"] == pretraining_only
    beside = load_file(result.out_dir / "qformer_pretraining.safetensors")
    assert sorted(beside) == pretraining_only and torch.equal(beside["temp"], model.temp.detach())
    assert record["temperature"] == pytest.approx(float(model.temp.detach()))
    assert record["frozen_tower_dtypes"] == {"vision": "float32"} and record["stored_dtype"] == "float32"
    readme = (result.out_dir / "README.md").read_text()
    assert "Blip2ForImageTextRetrieval" in readme and "the outputs equal ours" in readme


def test_trained_weights_are_the_exported_ones(stage1):
    model, _, exported, _ = stage1
    ours = model.state_dict()
    theirs = exported.state_dict()
    torch.testing.assert_close(theirs["vision_model.post_layernorm.weight"], ours["ln_vision.weight"])
    for name in ("query_tokens", "itm_head.weight", "embeddings.word_embeddings.weight",
                 "qformer.encoder.layer.0.crossattention.attention.query.weight"):
        torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=0)


@pytest.mark.parametrize("use_itm", [False, True], ids=["itc", "itm"])
def test_retrieval_scores_equal_ours(stage1, use_itm):
    model, _, exported, processor = stage1
    inputs = _inputs(processor, 4, seed=10)
    pixels = inputs["pixel_values"]
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        # Our stage-1 forward on the same batch: ITC similarities and ITM logits of its pairs.
        ours = model(pixel_values=pixels, input_ids=ids[:, QUERIES:], attention_mask=mask[:, QUERIES:])
        if use_itm:
            # Its 3B pairs: positives, then negative images, then negative captions.
            negative_images, negative_texts = ours.negative_images, ours.negative_texts
            theirs = exported(
                pixel_values=torch.cat([pixels, pixels[negative_images], pixels]),
                input_ids=torch.cat([ids, ids, ids[negative_texts]]),
                attention_mask=torch.cat([mask, mask, mask[negative_texts]]),
                use_image_text_matching_head=True,
            ).logits_per_image  # (3B, 2)
            torch.testing.assert_close(theirs, ours.itm_logits)
            assert ours.itm_logits.std(dim=0).min() > 1e-3  # the pairs score differently
        else:
            out = exported(pixel_values=pixels, input_ids=ids, attention_mask=mask)
            # transformers' ITC is the cosine similarity; ours divides it by the temperature.
            torch.testing.assert_close(out.logits_per_image, ours.sim_i2t * ours.temperature)
            torch.testing.assert_close(out.logits_per_text, ours.sim_t2i * ours.temperature)
            assert out.logits_per_image.std() > 1e-3


def test_processor_prepares_images_and_captions_as_training_did(stage1):
    model, result, exported, processor = stage1
    texts = captions(3, seed=20) + ["a red circle " * 10]  # the last one is truncated
    images = square_images(4, seed=21)
    inputs = processor(images=images, text=texts, padding="max_length", truncation=True, return_tensors="pt")

    tokenizer = CaptionTokenizer(TokenizerSpec(name=model.spec.qformer.bert, max_length=TEXT_LENGTH),
                                 append_eos=False)
    expected = tokenizer(texts)
    # Q <image> placeholders, which the model strips (config.image_token_index), then the caption.
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_token == exported.config.image_token_index == result.record["image_token_index"]
    assert (inputs["input_ids"][:, :QUERIES] == image_token).all()
    assert inputs["input_ids"][:, QUERIES:].tolist() == expected.input_ids.tolist()
    assert inputs["attention_mask"][:, QUERIES:].tolist() == expected.attention_mask.tolist()

    prep = image_preprocessing(model.spec.vision)
    pixels = np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])  # (B, H, W, 3)
    normalised = (pixels - np.asarray(prep.mean)) / np.asarray(prep.std)
    torch.testing.assert_close(inputs["pixel_values"],
                               torch.from_numpy(normalised).permute(0, 3, 1, 2).float())

