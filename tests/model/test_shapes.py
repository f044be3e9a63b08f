"""Shapes and dtypes through every path, with tiny checkpoints loaded like real ones."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.model import Blip2Pretrainer, build_qformer_tokenizer, image_preprocessing
from pipeline.spec.model import VisionTowerSpec
from pipeline.model.vision import IMAGENET_MEAN, VisionTowerError, load_vision_tower

from .tiny import IMAGE_SIZE, LLM_VOCAB, VISION_LAYERS, VISION_WIDTH, caption_batch, tiny_spec

CAPTIONS = ["a red circle", "a blue triangle", "the green rectangle"]
# Patch tokens (4 x 4) plus the class token; Dinov2 adds no registers by default.
TOKENS = (IMAGE_SIZE // 8) ** 2 + 1


@pytest.mark.parametrize(
    ("kind", "tokens"),
    [
        ("dinov2", TOKENS),
        ("vit", TOKENS),
        ("clip", TOKENS),
        ("siglip", TOKENS - 1),  # no class token
        ("blip2", TOKENS),
    ],
)
def test_stage1_shapes(kind, tokens, vision_dirs, bert_dir):
    spec = tiny_spec(vision_dirs(kind), bert_dir)
    model = Blip2Pretrainer(spec, objective=1)
    tokenizer = build_qformer_tokenizer(spec.qformer)
    batch = caption_batch(tokenizer, CAPTIONS)
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)

    assert model.encode_image(pixels).shape == (3, tokens, VISION_WIDTH)
    out = model(pixel_values=pixels, **batch)

    vocab = len(tokenizer)
    assert model.embeddings.word_embeddings.num_embeddings == vocab
    assert out.query_output.shape == (3, 4, 32)
    assert out.sim_i2t.shape == out.sim_t2i.shape == (3, 3)
    assert out.itm_logits.shape == (6 + 3, 2) and out.itg_logits.shape == (3, 12, vocab)
    assert out.negative_texts.shape == out.negative_images.shape == (3,)
    assert (out.negative_texts != torch.arange(3)).all()
    assert (out.negative_images != torch.arange(3)).all()
    for loss in (out.loss, out.loss_itc, out.loss_itm, out.loss_itg):
        assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(out.loss, out.loss_itc + out.loss_itm + out.loss_itg)
    out.loss.backward()
    assert model.query_tokens.grad is not None and model.temp.grad is not None


def test_vision_tower_in_bfloat16_with_dropped_layer(vision_dirs, bert_dir):
    spec = tiny_spec(vision_dirs("dinov2"), bert_dir).model_copy(
        update={"vision": VisionTowerSpec(name=str(vision_dirs("dinov2")), dtype="bfloat16")}
    )
    model = Blip2Pretrainer(spec, objective=1)
    assert all(p.dtype == torch.bfloat16 for p in model.vision_model.parameters())
    assert len(model.vision_model.encoder.layer) == VISION_LAYERS - 1
    assert model.vision_model.config.num_hidden_layers == VISION_LAYERS - 1
    assert model.ln_vision.weight.dtype == torch.float32
    assert model.encode_image(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)).dtype == torch.float32
    tokenizer = build_qformer_tokenizer(spec.qformer)
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    out = model(pixel_values=pixels, **caption_batch(tokenizer, CAPTIONS[:2]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.ln_vision.weight.grad is not None


def test_keeping_the_last_layer(vision_dirs):
    spec = VisionTowerSpec(name=str(vision_dirs("clip")), drop_last_layer=False, dtype="float32")
    tower = load_vision_tower(spec)
    assert len(tower.encoder.layers) == VISION_LAYERS


def test_vision_checkpoint_without_tower_weights_is_an_error(vision_dirs, tmp_path):
    # A BLIP-2 vision config over weights that are not there must not load as random weights.
    src = vision_dirs("blip2")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(VisionTowerError, match="not in the checkpoint"):
        load_vision_tower(VisionTowerSpec(name=str(tmp_path), dtype="float32"))


@pytest.mark.parametrize("llm", ["llama", "gpt2", "opt"])
def test_stage2_shapes_and_labels(llm, vision_dirs, bert_dir, llm_dirs):
    spec = tiny_spec(vision_dirs("vit"), bert_dir, llm_dirs(llm))
    model = Blip2Pretrainer(spec, objective=2)
    assert not hasattr(model, "embeddings") and not hasattr(model, "itm_head")
    assert model.language_projection.out_features == 32
    ids = torch.randint(0, LLM_VOCAB, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0

    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    out = model(pixel_values=pixels, llm_input_ids=ids, llm_attention_mask=mask)
    assert out.logits.shape == (2, 4 + 7, LLM_VOCAB)
    assert out.query_output.shape == (2, 4, 32)
    # The loss is the LLM's next-token CE on caption tokens only; query slots predict the first.
    logits = out.logits[:, 3:-1].float()  # positions Q-1 .. Q+T-2 predict tokens 0 .. T-1
    expected = torch.nn.functional.cross_entropy(logits[mask.bool()], ids[mask.bool()])
    torch.testing.assert_close(out.loss_lm, expected, rtol=1e-4, atol=1e-4)
    out.loss.backward()
    assert model.language_projection.weight.grad is not None
    assert all(p.grad is None for p in model.language_model.parameters())


def test_stage2_in_bfloat16_with_a_prompt(vision_dirs, bert_dir, llm_dirs):
    spec = tiny_spec(vision_dirs("vit"), bert_dir, llm_dirs("llama"))
    spec = spec.model_copy(update={"llm": spec.llm.model_copy(update={"dtype": "bfloat16"})})
    model = Blip2Pretrainer(spec, objective=2)
    assert model.language_model.dtype == torch.bfloat16
    ids = torch.randint(0, LLM_VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    out = model(
        pixel_values=torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE),
        llm_input_ids=ids,
        llm_attention_mask=mask,
        prompt_lengths=torch.tensor([2, 3]),
    )
    logits = out.logits[:, 3:-1].float()
    keep = torch.arange(6)[None] >= torch.tensor([2, 3])[:, None]
    expected = torch.nn.functional.cross_entropy(logits[keep], ids[keep])
    torch.testing.assert_close(out.loss_lm.float(), expected, rtol=2e-2, atol=2e-2)
    out.loss.backward()
    assert model.language_projection.weight.grad.dtype == torch.float32


def test_image_preprocessing_reads_the_processor_config(vision_dirs, tmp_path):
    folder = tmp_path / "tower"
    folder.mkdir()
    src = vision_dirs("clip")
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((src / name).read_bytes())
    processor = {
        "do_center_crop": True,
        "crop_size": {"height": 24, "width": 24},
        "size": {"shortest_edge": 28},
        "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.2, 0.2],
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    prep = image_preprocessing(VisionTowerSpec(name=str(folder)))
    assert prep.mean == (0.5, 0.4, 0.3) and prep.std == (0.2, 0.2, 0.2) and prep.image_size == 24
    assert image_preprocessing(VisionTowerSpec(name=str(folder), image_size=64)).image_size == 64


def test_image_preprocessing_defaults(vision_dirs):
    prep = image_preprocessing(VisionTowerSpec(name=str(vision_dirs("dinov2"))))
    assert prep.mean == IMAGENET_MEAN and prep.image_size == IMAGE_SIZE
