"""Frozen towers: no gradients, unchanged weights, eval mode; trainable state round trips."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from pipeline.model import (
    Blip2Pretrainer,
    build_qformer_tokenizer,
    count_parameters,
    freeze,
    is_frozen,
)

from .tiny import IMAGE_SIZE, LLM_VOCAB, caption_batch, tiny_spec

TRAINABLE_ROOTS = {
    "query_tokens",
    "ln_vision",
    "embeddings",
    "qformer",
    "vision_projection",
    "text_projection",
    "itm_head",
    "lm_head",
    "temp",
}


@pytest.fixture
def stage1(vision_dirs, bert_dir):
    spec = tiny_spec(vision_dirs("clip"), bert_dir)
    torch.manual_seed(0)
    model = Blip2Pretrainer(spec, objective=1)
    tokenizer = build_qformer_tokenizer(spec.qformer)
    batch = caption_batch(tokenizer, ["a red circle", "a blue triangle", "a shape"])
    batch["pixel_values"] = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    return model, batch


def test_vision_tower_stays_in_eval_mode(stage1):
    model, _ = stage1
    model.train()
    assert model.training and model.qformer.training
    assert not any(m.training for m in model.vision_model.modules())
    model.eval()
    model.train()
    assert not model.vision_model.training
    assert is_frozen(model.vision_model) and not is_frozen(model.qformer)


def test_freeze_survives_copy_and_pickle():
    module = freeze(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()))
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        parent = torch.nn.Sequential(clone).train()
        assert parent.training and not any(m.training for m in clone.modules())
        assert is_frozen(clone)


def test_only_trainable_parts_get_gradients_and_change(stage1):
    model, batch = stage1
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.vision_model.named_parameters()}
    trainable = model.trainable_state_dict()
    before = {n: p.clone() for n, p in trainable.items()}
    assert {name.split(".")[0] for name in trainable} == TRAINABLE_ROOTS

    model(**batch).loss.backward()
    assert all(p.grad is None for p in model.vision_model.parameters())
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"trainable parameters without gradient: {no_grad}"

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    optimizer.step()
    for name, param in model.vision_model.named_parameters():
        assert torch.equal(param, frozen[name]), name
    changed = [n for n, p in model.trainable_state_dict().items() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_parameter_counts(stage1):
    model, _ = stage1
    counts = model.parameter_counts()
    vision = sum(p.numel() for p in model.vision_model.parameters())
    assert counts.frozen == vision
    assert counts.trainable == sum(p.numel() for p in model.trainable_state_dict().values())
    assert counts.total == counts.trainable + counts.frozen
    assert "trainable" in str(counts)
    assert count_parameters(model.vision_model).trainable == 0


def test_trainable_state_round_trip_and_stage2_init(stage1, vision_dirs, bert_dir, llm_dirs):
    model, batch = stage1
    model.eval()
    state = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    torch.manual_seed(1)
    fresh = Blip2Pretrainer(model.spec, objective=1).eval()
    assert fresh.load_trainable_state_dict(state) == ([], [])
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).loss_itg, model(**batch).loss_itg)
    with pytest.raises(KeyError):
        fresh.load_trainable_state_dict({"nope": torch.zeros(1)})

    spec2 = tiny_spec(vision_dirs("clip"), bert_dir, llm_dirs("opt"))
    stage2 = Blip2Pretrainer(spec2, objective=2)
    missing, unexpected = stage2.load_trainable_state_dict(state, strict=False)
    assert missing == ["language_projection.bias", "language_projection.weight"]
    caption_side = {"embeddings", "text_projection", "vision_projection", "itm_head", "lm_head"}
    assert {n.split(".")[0] for n in unexpected} == caption_side | {"temp", "qformer"}
    text_ffn = [n for n in unexpected if n.startswith("qformer")]
    assert text_ffn and all(".intermediate." in n or ".output." in n for n in text_ffn)
    torch.testing.assert_close(stage2.query_tokens, model.query_tokens)


def test_stage2_llm_is_frozen(vision_dirs, bert_dir, llm_dirs):
    spec = tiny_spec(vision_dirs("vit"), bert_dir, llm_dirs("gpt2"))
    model = Blip2Pretrainer(spec, objective=2).train()
    llm_before = {n: p.clone() for n, p in model.language_model.named_parameters()}
    assert is_frozen(model.language_model) and not model.language_model.training
    ids = torch.randint(0, LLM_VOCAB, (2, 5))
    out = model(
        pixel_values=torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE),
        llm_input_ids=ids,
        llm_attention_mask=torch.ones_like(ids),
    )
    out.loss.backward()
    assert all(p.grad is None for p in model.language_model.parameters())
    assert all(p.grad is None for p in model.vision_model.parameters())
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    for name, param in model.language_model.named_parameters():
        assert torch.equal(param, llm_before[name])
    trainable_roots = {n.split(".")[0] for n in model.trainable_state_dict()}
    assert trainable_roots == {"query_tokens", "ln_vision", "qformer", "language_projection"}
