"""The ITG pass: causal captions that read the queries, queries that never read the captions."""

from __future__ import annotations

import torch

from pipeline.model import Blip2Pretrainer, build_qformer_tokenizer
from pipeline.model.losses import IGNORE_INDEX, language_model_labels
from pipeline.model.qformer import unilm_attention_mask

from .tiny import IMAGE_SIZE, caption_batch, tiny_spec


def test_unilm_mask_pattern():
    text_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    mask = unilm_attention_mask(text_mask, num_queries=2)
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    expected_row0 = torch.tensor(
        [
            [1, 1, 0, 0, 0],  # queries: queries only
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],  # text: all queries, earlier text
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask[0, 0], expected_row0)
    assert not mask[1, 0, :, 4].any()  # padding is never attended to


def _model_and_batch(vision_dirs, bert_dir):
    spec = tiny_spec(vision_dirs("vit"), bert_dir)
    torch.manual_seed(0)
    model = Blip2Pretrainer(spec, objective=1).eval()
    tokenizer = build_qformer_tokenizer(spec.qformer)
    batch = caption_batch(tokenizer, ["a red circle", "a blue triangle"])
    return model, tokenizer, batch, torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_later_tokens_do_not_change_earlier_logits(vision_dirs, bert_dir):
    model, tokenizer, batch, pixels = _model_and_batch(vision_dirs, bert_dir)
    changed = {k: v.clone() for k, v in batch.items()}
    position = 3  # [CLS] a red |circle| [SEP]
    changed["input_ids"][0, position] = tokenizer.convert_tokens_to_ids("rectangle")
    with torch.no_grad():
        before = model(pixel_values=pixels, **batch)
        after = model(pixel_values=pixels, **changed)

    torch.testing.assert_close(after.itg_logits[0, :position], before.itg_logits[0, :position])
    assert not torch.allclose(after.itg_logits[0, position:], before.itg_logits[0, position:])
    torch.testing.assert_close(after.itg_logits[1], before.itg_logits[1])
    # Queries attend to queries and the image only.
    torch.testing.assert_close(after.query_output, before.query_output)


def test_queries_ignore_the_caption_and_match_an_image_only_pass(vision_dirs, bert_dir):
    model, tokenizer, batch, pixels = _model_and_batch(vision_dirs, bert_dir)
    other = caption_batch(tokenizer, ["the yellow rectangle is a shape", "a gray shape"])
    with torch.no_grad():
        out = model(pixel_values=pixels, **batch)
        out_other = model(pixel_values=pixels, **other)
        image_only = model.query_image(model.encode_image(pixels))
    torch.testing.assert_close(out_other.query_output, out.query_output)
    torch.testing.assert_close(image_only, out.query_output, rtol=1e-5, atol=1e-5)


def test_itg_loss_ignores_padding_and_uses_dec(vision_dirs, bert_dir):
    model, tokenizer, batch, pixels = _model_and_batch(vision_dirs, bert_dir)
    with torch.no_grad():
        out = model(pixel_values=pixels, **batch)
    padding = batch["attention_mask"][:, 1:] == 0
    labels = batch["input_ids"][:, 1:].masked_fill(padding, IGNORE_INDEX)
    expected = torch.nn.functional.cross_entropy(
        out.itg_logits[:, :-1].flatten(0, 1), labels.flatten(), label_smoothing=0.1
    )
    torch.testing.assert_close(out.loss_itg, expected)
    assert model.dec_token_id == tokenizer.convert_tokens_to_ids("[DEC]") == len(tokenizer) - 1


def test_language_model_labels():
    ids = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = language_model_labels(ids, mask, num_queries=2, prompt_lengths=torch.tensor([1, 0]))
    x = IGNORE_INDEX
    assert labels.tolist() == [[x, x, x, 6, 7, 2], [x, x, 8, 9, 2, x]]
    # A leading begin-of-text token is input only; the same id elsewhere stays a target.
    ids = torch.tensor([[0, 6, 0, 2], [8, 9, 2, 0]])
    labels = language_model_labels(ids, mask, num_queries=1, bos_token_id=0)
    assert labels.tolist() == [[x, x, 6, 0, 2], [x, 8, 9, 2, x]]
