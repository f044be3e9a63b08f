"""A stage-2 checkpoint exported as transformers' Blip2ForConditionalGeneration captions as ours does."""

from __future__ import annotations

import pytest
import torch
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from pipeline.export import export_checkpoint
from pipeline.model import Blip2Pretrainer, build_llm_tokenizer
from pipeline.model.generate import DecodingSpec, generate_captions, prefix_ids

from tests.export.helpers import model_section, square_images, train_and_checkpoint

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def stage2(towers, tmp_path_factory):
    """A trained stage-2 model, exported from its stage folder, and the exported model."""
    run = tmp_path_factory.mktemp("runs") / "captioning"
    trained = train_and_checkpoint(run, model_section(towers.blip2_vision, towers.bert, towers.llm), objective=2)
    result = export_checkpoint(str(run / "stage2"), tmp_path_factory.mktemp("export") / "stage2")
    exported = Blip2ForConditionalGeneration.from_pretrained(result.out_dir).eval()
    return trained.model, result, exported, Blip2Processor.from_pretrained(result.out_dir)


def _our_inputs(model: Blip2Pretrainer, pixel_values: torch.Tensor, prompt: list[int]) -> torch.Tensor:
    """(B, Q + T, D) our LLM input: the visual prompt, then the prompt tokens."""
    embed = model.language_model.get_input_embeddings()
    _, visual = model.visual_prompt(pixel_values)  # (B, Q, D)
    prompt_embeds = embed(torch.tensor(prompt, dtype=torch.long))  # (T, D)
    return torch.cat([visual, prompt_embeds.expand(len(visual), -1, -1)], dim=1)


def _greedy(model: Blip2Pretrainer, inputs: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding written out: the whole sequence through our frozen LLM at every step."""
    embed = model.language_model.get_input_embeddings()
    tokens = []
    for _ in range(steps):
        logits = model.language_model(inputs_embeds=inputs).logits[:, -1]  # (B, V)
        tokens.append(logits.argmax(dim=-1))
        inputs = torch.cat([inputs, embed(tokens[-1])[:, None]], dim=1)  # (B, T + 1, D)
    return torch.stack(tokens, dim=1)  # (B, steps)


def _until_end(tokens: torch.Tensor, eos: int) -> list[list[int]]:
    """Each row up to its first end-of-text (kept): what follows is padding in transformers'
    generate and more tokens in :func:`_greedy`."""
    rows = tokens.tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def test_stage2_is_written_as_a_generation_model_folder(stage2):
    model, result, exported, processor = stage2
    record = result.record
    assert record["format"] == "transformers"
    assert record["transformers_class"] == "Blip2ForConditionalGeneration"
    assert record["stage_name"] == "stage2" and record["pretraining_only"] == []
    assert not (result.out_dir / "qformer_pretraining.safetensors").exists()
    assert (result.out_dir / "generation_config.json").is_file()
    config = exported.config
    assert config.use_decoder_only_language_model and config.num_query_tokens == 4
    assert not config.qformer_config.use_qformer_text_input  # stage 2 has no caption branch
    # <image> takes the first spare row of the LLM's embedding table, so no row is added.
    vocabulary = len(build_llm_tokenizer(model.spec.llm))
    assert config.image_token_index == vocabulary == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert exported.language_model.get_input_embeddings().num_embeddings == vocabulary + 64
    torch.testing.assert_close(exported.language_projection.weight, model.language_projection.weight,
                               rtol=0, atol=0)


@pytest.mark.parametrize("prompt", ["", "a photo of"], ids=["no-prompt", "prompt"])
def test_greedy_captions_equal_ours(stage2, prompt):
    model, _, exported, processor = stage2
    inputs = processor(images=square_images(3, seed=30), text=[prompt] * 3, return_tensors="pt")
    start = inputs["input_ids"].shape[1]  # Q <image> placeholders, then the prompt
    theirs = exported.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[:, start:]

    tokenizer = build_llm_tokenizer(model.spec.llm)
    with torch.no_grad():
        ours_in = _our_inputs(model, inputs["pixel_values"], prefix_ids(tokenizer, prompt))
        # The LLM sees the same sequence: the projected queries where the <image> ids are.
        logits = model.language_model(inputs_embeds=ours_in).logits  # (B, Q + T, V)
        torch.testing.assert_close(exported(**inputs).logits, logits)
        assert (logits[0, -1] - logits[1, -1]).abs().max() > 1e-2  # and it depends on the image
        ours = _greedy(model, ours_in, NEW_TOKENS)
    assert _until_end(theirs, tokenizer.eos_token_id) == _until_end(ours, tokenizer.eos_token_id)
    captions = generate_captions(model, tokenizer, inputs["pixel_values"],
                                 DecodingSpec(max_new_tokens=NEW_TOKENS, prompt=prompt))
    assert captions == [text.strip() for text in processor.batch_decode(theirs, skip_special_tokens=True)]


def test_beam_search_captions_equal_ours(stage2):
    model, _, exported, processor = stage2
    inputs = processor(images=square_images(2, seed=31), text=[""] * 2, return_tensors="pt")
    theirs = exported.generate(**inputs, max_new_tokens=NEW_TOKENS, num_beams=3, do_sample=False)
    captions = generate_captions(model, build_llm_tokenizer(model.spec.llm), inputs["pixel_values"],
                                 DecodingSpec(num_beams=3, max_new_tokens=NEW_TOKENS))
    texts = processor.batch_decode(theirs[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert captions == [text.strip() for text in texts]
