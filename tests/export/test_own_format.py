"""Our own export format: used when transformers cannot compute the model exactly; loads back exactly."""

from __future__ import annotations

import pytest
import torch

from pipeline.assets import TINY_LLAMA
from pipeline.export import ExportError, export_checkpoint, load_exported
from pipeline.export.compat import transformers_blockers
from pipeline.model import Blip2Pretrainer, build_llm_tokenizer, build_qformer_tokenizer
from pipeline.spec.model import ModelSpec
from pipeline.model.generate import DecodingSpec, generate_captions

from tests.export.helpers import captions, model_section, train_and_checkpoint

OWN_FILES = {"trainable.safetensors", "qformer_export.json", "README.md"}


@pytest.fixture(scope="module")
def dinov2_stage1(towers, tmp_path_factory):
    """A trained stage-1 model on a Dinov2 tower, exported with ``auto``."""
    run = tmp_path_factory.mktemp("runs") / "dinov2"
    trained = train_and_checkpoint(run, model_section(towers.dinov2_vision, towers.bert, towers.llm), objective=1)
    return trained, export_checkpoint(str(trained.checkpoint), tmp_path_factory.mktemp("export") / "own")


def test_a_model_transformers_cannot_compute_is_written_in_our_format(dinov2_stage1):
    trained, result = dinov2_stage1
    record = result.record
    assert record["format"] == "qformer" and record["stage"] == 1 and record["step"] == 3
    assert len(result.blockers) == 1 and "Dinov2Model" in result.blockers[0]
    assert record["transformers_blockers"] == result.blockers
    assert {path.name for path in result.out_dir.iterdir()} == OWN_FILES
    checkpoint_weights = (trained.checkpoint / "trainable.safetensors").read_bytes()
    assert (result.out_dir / "trainable.safetensors").read_bytes() == checkpoint_weights
    assert ModelSpec.model_validate(record["model"]) == trained.model.spec
    readme = (result.out_dir / "README.md").read_text()
    assert "Dinov2Model" in readme and "load_exported" in readme


def test_the_own_format_loads_back_as_the_trained_model(dinov2_stage1):
    trained, result = dinov2_stage1
    loaded = load_exported(result.out_dir)
    assert isinstance(loaded, Blip2Pretrainer) and loaded.objective == 1 and not loaded.training
    ours = trained.model.trainable_state_dict()
    theirs = loaded.trainable_state_dict()
    assert theirs.keys() == ours.keys()
    for name, value in ours.items():
        torch.testing.assert_close(theirs[name], value, rtol=0, atol=0, msg=name)

    tokenizer = build_qformer_tokenizer(loaded.spec.qformer)
    text = tokenizer(captions(4, seed=40), padding="max_length", max_length=12, return_tensors="pt")
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(41))
    outputs = []
    for model in (trained.model, loaded):
        with torch.no_grad():
            outputs.append(model(pixel_values=pixels, input_ids=text["input_ids"],
                                 attention_mask=text["attention_mask"]))
    expected, actual = outputs
    for name in ("loss", "sim_i2t", "itm_logits", "itg_logits"):
        torch.testing.assert_close(actual[name], expected[name], msg=name)


def test_an_llm_without_a_spare_embedding_row_falls_back_and_loads_back(towers, tmp_path):
    run = tmp_path / "runs" / "no-spare-row"
    trained = train_and_checkpoint(run, model_section(towers.blip2_vision, towers.bert, TINY_LLAMA), objective=2)
    with pytest.raises(ExportError, match="no spare row"):
        export_checkpoint(str(trained.checkpoint), tmp_path / "hf", export_format="transformers")
    assert not (tmp_path / "hf").exists()

    result = export_checkpoint(str(trained.checkpoint), tmp_path / "own")
    assert result.record["format"] == "qformer" and result.record["stage"] == 2
    assert len(result.blockers) == 1 and "<image>" in result.blockers[0]
    loaded = load_exported(result.out_dir)
    tokenizer = build_llm_tokenizer(loaded.spec.llm)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(42))
    decoding = DecodingSpec(max_new_tokens=6)
    assert generate_captions(loaded, tokenizer, pixels, decoding) == generate_captions(
        trained.model, tokenizer, pixels, decoding)


def test_our_format_on_request_for_a_model_transformers_could_hold(towers, tmp_path):
    trained = train_and_checkpoint(tmp_path / "runs" / "asked", model_section(
        towers.blip2_vision, towers.bert, towers.llm), objective=1, steps=1)
    result = export_checkpoint(str(trained.checkpoint), tmp_path / "own", export_format="own")
    assert result.record["format"] == "qformer" and result.blockers == []
    assert {path.name for path in result.out_dir.iterdir()} == OWN_FILES
    assert "--format own" in (result.out_dir / "README.md").read_text()

    transformers_folder = export_checkpoint(str(trained.checkpoint), tmp_path / "hf").out_dir
    with pytest.raises(ExportError, match="from_pretrained"):
        load_exported(transformers_folder)
    with pytest.raises(ExportError, match="qformer_export.json"):
        load_exported(tmp_path)


def test_another_image_size_than_the_towers_blocks_transformers(towers):
    section = model_section(towers.blip2_vision, towers.bert, towers.llm)
    section["vision"]["image_size"] = 48  # the tower's position embeddings are for 32 px
    model = Blip2Pretrainer(ModelSpec.model_validate(section), objective=1)
    blockers = transformers_blockers(model, build_qformer_tokenizer(model.spec.qformer))
    assert len(blockers) == 1 and "48 px" in blockers[0] and "32 px" in blockers[0]
