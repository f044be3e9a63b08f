"""Tiny random checkpoints, saved with ``save_pretrained`` and loaded back like real ones."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertTokenizer,
    Blip2VisionConfig,
    Blip2VisionModel,
    CLIPConfig,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)

from pipeline.spec.model import ModelSpec

IMAGE_SIZE = 32
VISION_WIDTH = 32
VISION_LAYERS = 3
_VISION = dict(
    hidden_size=VISION_WIDTH,
    intermediate_size=64,
    num_hidden_layers=VISION_LAYERS,
    num_attention_heads=2,
    image_size=IMAGE_SIZE,
    patch_size=8,
)
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
_WORDS = ("a", "an", "the", "photo", "of", "shape", "is", *COLORS, *SHAPES)
LLM_VOCAB = 64


def save_vision_tower(kind: str, out: Path, **config) -> Path:
    """Save a tiny vision model of ``kind`` (dinov2, vit, clip, siglip, blip2) to ``out``.

    ``config`` overrides the tiny defaults (hidden 32, image 32, patch 8, 3 layers).
    """
    torch.manual_seed(0)
    vision = {**_VISION, **config}
    if kind == "dinov2":
        model = Dinov2Model(Dinov2Config(**vision, mlp_ratio=2))
    elif kind == "vit":
        model = ViTModel(ViTConfig(**vision), add_pooling_layer=False)
    elif kind == "clip":
        # A whole CLIP checkpoint: the loader must pick its vision half.
        text = dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    elif kind == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**vision, vision_use_head=False))
    elif kind == "blip2":
        model = Blip2VisionModel(Blip2VisionConfig(**vision))
    else:
        raise ValueError(kind)
    model.save_pretrained(out)
    return out


def caption_vocab() -> list[str]:
    """A WordPiece vocabulary covering the test captions."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in _WORDS]
    return specials + list(_WORDS) + letters + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]


def save_bert(
    out: Path, *, layers: int = 4, hidden: int = 32, initializer_range: float = 0.02
) -> Path:
    """Save a tiny BERT masked LM with its caption tokenizer to ``out``."""
    torch.manual_seed(0)
    vocab = caption_vocab()
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=initializer_range,
    )
    BertForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_llm(kind: str, out: Path) -> Path:
    """Save a tiny causal LM of ``kind`` (llama, gpt2, opt) to ``out``."""
    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=LLM_VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=128,
        )
        model = LlamaForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=LLM_VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=128)
        model = GPT2LMHeadModel(config)
    elif kind == "opt":
        config = OPTConfig(
            vocab_size=LLM_VOCAB,
            hidden_size=32,
            word_embed_proj_dim=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=128,
        )
        model = OPTForCausalLM(config)
    else:
        raise ValueError(kind)
    model.save_pretrained(out)
    return out


def tiny_spec(vision: Path, bert: Path | str, llm: Path | None = None, **losses) -> ModelSpec:
    """A small model spec over tiny checkpoints (4 queries, 16-d contrastive features)."""
    return ModelSpec.model_validate(
        {
            "vision": {"name": str(vision), "dtype": "float32"},
            "qformer": {
                "bert": str(bert),
                "num_query_tokens": 4,
                "embed_dim": 16,
                "max_text_length": 12,
            },
            "llm": {"name": str(llm or "unused"), "dtype": "float32"},
            "losses": losses,
        }
    )


def caption_batch(tokenizer, captions: list[str], max_length: int = 12) -> dict[str, torch.Tensor]:
    """``[CLS] caption [SEP]`` ids right-padded to ``max_length``, as the data pipeline does."""
    enc = tokenizer(
        captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
