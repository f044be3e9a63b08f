"""State-dict adapters (ours <-> transformers Blip2, ours <-> LAVIS) and the one definition of the
parts only one objective builds."""

from __future__ import annotations

import pytest
import torch

from pipeline.model import Blip2Pretrainer
from pipeline.model.adapters.lavis import from_lavis, to_lavis
from pipeline.model.adapters.transformers_blip2 import (
    PRETRAINING_ONLY,
    from_transformers,
    pretraining_only,
    to_transformers,
)
from pipeline.model.parts import is_frozen_tower, objective_of_weights, objective_only

from .tiny import tiny_spec

# LAVIS's names (lavis/models/blip2_models/{blip2_qformer,Qformer,blip2_opt}.py), written out by
# hand for the first two layers (layer 0 has cross-attention: cross_attention_freq 2) and the rest.
LAVIS_NAMES = {
    "query_tokens": "query_tokens",
    "temp": "temp",
    "ln_vision.weight": "ln_vision.weight",
    "embeddings.word_embeddings.weight": "Qformer.bert.embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "Qformer.bert.embeddings.position_embeddings.weight",
    "qformer.layernorm.bias": "Qformer.bert.embeddings.LayerNorm.bias",
    "qformer.encoder.layer.0.attention.attention.query.weight":
        "Qformer.bert.encoder.layer.0.attention.self.query.weight",
    "qformer.encoder.layer.0.attention.output.dense.weight":
        "Qformer.bert.encoder.layer.0.attention.output.dense.weight",
    "qformer.encoder.layer.0.crossattention.attention.key.weight":
        "Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
    "qformer.encoder.layer.0.crossattention.output.LayerNorm.weight":
        "Qformer.bert.encoder.layer.0.crossattention.output.LayerNorm.weight",
    "qformer.encoder.layer.1.intermediate.dense.weight": "Qformer.bert.encoder.layer.1.intermediate.dense.weight",
    "qformer.encoder.layer.1.output.LayerNorm.bias": "Qformer.bert.encoder.layer.1.output.LayerNorm.bias",
    "qformer.encoder.layer.1.intermediate_query.dense.bias":
        "Qformer.bert.encoder.layer.1.intermediate_query.dense.bias",
    "qformer.encoder.layer.1.output_query.dense.weight": "Qformer.bert.encoder.layer.1.output_query.dense.weight",
    "vision_projection.weight": "vision_proj.weight",
    "text_projection.bias": "text_proj.bias",
    "itm_head.weight": "itm_head.weight",
    "lm_head.transform.dense.weight": "Qformer.cls.predictions.transform.dense.weight",
    "lm_head.transform.LayerNorm.bias": "Qformer.cls.predictions.transform.LayerNorm.bias",
    "lm_head.decoder.bias": "Qformer.cls.predictions.bias",
}


@pytest.fixture(scope="module")
def models(vision_dirs, bert_dir, llm_dirs):
    """A stage-1 and a stage-2 model over the same tiny towers (a Blip2VisionModel tower)."""
    spec = tiny_spec(vision_dirs("blip2"), bert_dir, llm_dirs("opt"))
    torch.manual_seed(0)
    return Blip2Pretrainer(spec, objective=1), Blip2Pretrainer(spec, objective=2)


def _trainable(model: Blip2Pretrainer) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in model.trainable_state_dict().items()}


def test_objective_only_parts_are_exactly_what_the_two_models_do_not_share(models):
    stage1, stage2 = (set(_trainable(model)) for model in models)
    assert {n for n in stage1 | stage2 if objective_only(n, 1)} == stage1 - stage2
    assert {n for n in stage1 | stage2 if objective_only(n, 2)} == stage2 - stage1 == {
        "language_projection.weight", "language_projection.bias"}
    # The query branch and the attention layers are shared, the text feed-forward is not.
    assert not objective_only("qformer.encoder.layer.0.attention.output.dense.weight", 1)
    assert not objective_only("qformer.encoder.layer.0.output_query.dense.weight", 1)
    assert objective_only("qformer.encoder.layer.0.output.dense.weight", 1)
    assert objective_of_weights(stage1) == 1 and objective_of_weights(stage2) == 2
    assert objective_of_weights(stage1 & stage2) is None and objective_of_weights(stage1 | stage2) is None
    frozen = [name for name in models[1].full_state_dict() if is_frozen_tower(name)]
    assert frozen and not set(frozen) & stage2


def test_lavis_names_are_lavis_own_and_map_back_to_the_same_tensors(models):
    stage1, stage2 = (_trainable(model) for model in models)
    lavis = to_lavis(stage1)
    for ours, theirs in LAVIS_NAMES.items():
        assert torch.equal(lavis[theirs].reshape(stage1[ours].shape), stage1[ours]), theirs
    assert lavis["temp"].shape == ()  # LAVIS: nn.Parameter(0.07 * torch.ones([]))
    # LAVIS's state dict also holds the decoder tied to the word embeddings and the position ids.
    assert lavis["Qformer.cls.predictions.decoder.weight"] is stage1["embeddings.word_embeddings.weight"]
    assert lavis["Qformer.bert.embeddings.position_ids"].tolist() == [list(range(64))]
    assert not [name for name in lavis if name.startswith(("qformer.", "lm_head.", "embeddings."))]

    for state in (stage1, stage2):
        back = from_lavis(to_lavis(state))
        assert back.keys() == state.keys()
        assert all(torch.equal(back[name], state[name]) and back[name].shape == state[name].shape
                   for name in state)
    assert "opt_proj.weight" in to_lavis(stage2)  # blip2_opt.py's projection into OPT


def test_lavis_frozen_towers_and_unknown_names(models):
    state = {"visual_encoder.blocks.0.attn.qkv.weight": torch.zeros(3),
             "opt_model.model.decoder.embed_tokens.weight": torch.zeros(3),
             "text_encoder.layer.0.weight": torch.zeros(3)}
    mapped = from_lavis(state)
    assert sorted(mapped) == ["language_model.model.decoder.embed_tokens.weight",
                              "text_encoder.layer.0.weight", "vision_model.blocks.0.attn.qkv.weight"]
    assert [is_frozen_tower(name) for name in sorted(mapped)] == [True, False, True]


def test_transformers_names_map_both_ways(models):
    stage1 = _trainable(models[0])
    theirs = to_transformers(stage1)
    assert "vision_model.post_layernorm.weight" in theirs and "ln_vision.weight" not in theirs
    assert not [name for name in theirs if name.startswith(PRETRAINING_ONLY)]
    beside = pretraining_only(stage1)
    assert sorted(beside) == sorted(name for name in stage1 if name == "temp" or name.startswith("lm_head."))
    back = from_transformers(theirs, beside)
    assert back.keys() == stage1.keys() and all(back[name] is stage1[name] for name in stage1)
    assert from_transformers({"language_model.lm_head.weight": torch.zeros(1)}).keys() == {
        "language_model.lm_head.weight"}
