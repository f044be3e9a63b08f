"""A whole BLIP-2 checkpoint (Blip2ForConditionalGeneration) as the frozen vision tower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from pipeline.model import image_preprocessing
from pipeline.spec.model import VisionTowerSpec
from pipeline.model.vision import VisionTowerError, encode_images, load_vision_tower
from pipeline.model.weight_files import read_prefixed_weights

IMAGE_SIZE = 32
LAYERS = 2
PREFIX = "vision_model."


@pytest.fixture(scope="module")
def blip2():
    """A tiny Blip2ForConditionalGeneration (ViT width 32, Q-Former width 32, OPT width 32)."""
    torch.manual_seed(0)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    qformer = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
    )
    text = OPTConfig(
        vocab_size=64,
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
    )
    config = Blip2Config(
        vision_config=vision, qformer_config=qformer, text_config=text.to_dict(), num_query_tokens=4
    )
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # a final norm that looks trained, so copying it is observable
        model.vision_model.post_layernorm.weight.uniform_(0.5, 1.5)
        model.vision_model.post_layernorm.bias.normal_(0.0, 0.1)
    return model


def _vision_state(model: Blip2ForConditionalGeneration) -> dict[str, torch.Tensor]:
    return {k[len(PREFIX):]: v for k, v in model.state_dict().items() if k.startswith(PREFIX)}


def _write_processor(folder: Path, processor: dict) -> None:
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))


def _save(model: Blip2ForConditionalGeneration, folder: Path, layout: str) -> Path:
    """Save ``model`` as one safetensors file, as small shards, or as one pytorch_model.bin."""
    if layout == "single":
        model.save_pretrained(folder)
    elif layout == "sharded":
        model.save_pretrained(folder, max_shard_size="20KB")
    else:
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    _write_processor(
        folder,
        {
            "do_center_crop": True,
            "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            "size": {"shortest_edge": IMAGE_SIZE},
            "image_mean": OPENAI_CLIP_MEAN,
            "image_std": OPENAI_CLIP_STD,
        },
    )
    return folder


def _drop_shards_without(folder: Path, prefix: str) -> int:
    """Delete every shard that holds no ``prefix`` key; returns how many were deleted."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {shard for key, shard in index.items() if key.startswith(prefix)}
    unneeded = set(index.values()) - needed
    for shard in unneeded:
        (folder / shard).unlink()
    return len(unneeded)


@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
def test_blip2_checkpoint_serves_its_vision_tower(blip2, tmp_path, layout):
    folder = _save(blip2, tmp_path, layout)
    if layout == "sharded":
        # The language model and the Q-Former are never read: their shards may be absent.
        assert _drop_shards_without(folder, PREFIX) > 0

    spec = VisionTowerSpec(name=str(folder), dtype="float32", drop_last_layer=False)
    tower = load_vision_tower(spec)

    assert type(tower).__name__ == "Blip2VisionModel"
    assert not any(p.requires_grad for p in tower.parameters()) and not tower.training
    expected = _vision_state(blip2)
    loaded = tower.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key

    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        reference = blip2.vision_model(pixel_values=pixels).last_hidden_state  # (B, P, D)
    tokens = (IMAGE_SIZE // 8) ** 2 + 1
    assert reference.shape == (2, tokens, 32)
    torch.testing.assert_close(tower(pixel_values=pixels).last_hidden_state, reference)
    torch.testing.assert_close(encode_images(tower, pixels), reference)


def test_saved_file_weights_are_the_ones_loaded(blip2, tmp_path):
    folder = _save(blip2, tmp_path, "sharded")
    with_vision = []
    for shard in sorted(folder.glob("model-*.safetensors")):
        with safe_open(shard, framework="pt") as reader:
            for key in reader.keys():
                if key.startswith(PREFIX):
                    with_vision.append((key[len(PREFIX):], reader.get_tensor(key)))
    state = read_prefixed_weights(str(folder), PREFIX)
    assert sorted(state) == sorted(key for key, _ in with_vision)
    for key, value in with_vision:
        assert torch.equal(state[key], value), key
    halves = read_prefixed_weights(str(folder), PREFIX, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in halves.values())


def test_dropping_the_last_layer_and_a_16_bit_tower(blip2, tmp_path, caplog):
    folder = _save(blip2, tmp_path, "single")
    spec = VisionTowerSpec(name=str(folder), dtype="bfloat16", drop_last_layer=True)
    with caplog.at_level("WARNING", logger="pipeline.model.vision"):
        tower = load_vision_tower(spec)
    # LAVIS already cut EVA ViT-g's last layer from a BLIP-2 checkpoint's tower: say so.
    assert "already lacks EVA ViT-g's last layer" in caplog.text
    assert len(tower.encoder.layers) == LAYERS - 1 and tower.config.num_hidden_layers == LAYERS - 1
    assert all(p.dtype == torch.bfloat16 for p in tower.parameters())

    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        out = blip2.vision_model(pixel_values=pixels, output_hidden_states=True)
        # Blip2VisionModel applies post_layernorm to its last block's output.
        reference = blip2.vision_model.post_layernorm(out.hidden_states[-2])
    features = encode_images(tower, pixels)
    assert features.dtype == torch.bfloat16
    torch.testing.assert_close(features.float(), reference, rtol=3e-2, atol=3e-2)


def test_blip2_checkpoint_without_vision_weights_is_an_error(blip2, tmp_path):
    folder = _save(blip2, tmp_path, "single")
    weights = folder / "model.safetensors"
    with safe_open(weights, framework="pt") as reader:
        others = {k: reader.get_tensor(k) for k in reader.keys() if not k.startswith(PREFIX)}
    save_file(others, str(weights), metadata={"format": "pt"})
    with pytest.raises(VisionTowerError, match="not in the checkpoint"):
        load_vision_tower(VisionTowerSpec(name=str(folder), dtype="float32"))


def test_blip2_config_without_weights_files_is_an_error(blip2, tmp_path):
    blip2.config.save_pretrained(tmp_path)
    with pytest.raises(VisionTowerError, match="no model.safetensors or pytorch_model.bin"):
        load_vision_tower(VisionTowerSpec(name=str(tmp_path), dtype="float32"))


def test_image_preprocessing_of_a_blip2_checkpoint(blip2, tmp_path):
    folder = _save(blip2, tmp_path, "single")
    prep = image_preprocessing(VisionTowerSpec(name=str(folder)))
    assert prep.mean == tuple(OPENAI_CLIP_MEAN) and prep.std == tuple(OPENAI_CLIP_STD)
    assert prep.image_size == IMAGE_SIZE

    # Salesforce/blip2-*'s own layout: BlipImageProcessor resizes to size, with no crop.
    _write_processor(
        folder,
        {
            "do_resize": True,
            "size": {"height": 224, "width": 224},
            "image_mean": OPENAI_CLIP_MEAN,
            "image_std": OPENAI_CLIP_STD,
        },
    )
    prep = image_preprocessing(VisionTowerSpec(name=str(folder)))
    assert prep.mean == tuple(OPENAI_CLIP_MEAN) and prep.image_size == 224

    # Without a processor file: ImageNet statistics and the vision config's image size.
    (folder / "preprocessor_config.json").unlink()
    assert image_preprocessing(VisionTowerSpec(name=str(folder))).image_size == IMAGE_SIZE


def test_ln_vision_takes_over_the_towers_final_norm(blip2, tmp_path):
    from pipeline.model.vision import adopt_output_norm

    tower = load_vision_tower(VisionTowerSpec(name=str(_save(blip2, tmp_path, "single")),
                                              dtype="float32", drop_last_layer=False))
    ln_vision = torch.nn.LayerNorm(32)
    assert adopt_output_norm(tower, ln_vision)
    torch.testing.assert_close(ln_vision.weight, blip2.vision_model.post_layernorm.weight)
    assert ln_vision.eps == blip2.vision_model.post_layernorm.eps == 1e-6  # not LayerNorm's 1e-5
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        reference = blip2.vision_model(pixel_values=pixels).last_hidden_state  # normalised once
        torch.testing.assert_close(ln_vision(encode_images(tower, pixels)), reference)
        assert not torch.allclose(encode_images(tower, pixels), reference)
