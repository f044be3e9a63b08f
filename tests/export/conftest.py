"""Tiny frozen towers for the export tests (the models trained on them: ``helpers.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pipeline.assets import TINY_LLAMA, resolve_tokenizer
from tests.helpers import one_thread  # noqa: F401 (autouse)
from tests.model.tiny import save_bert, save_vision_tower


@dataclass(frozen=True)
class Towers:
    """Folders of tiny frozen towers (width 32, 32 px images)."""

    blip2_vision: Path
    """A Blip2VisionModel (what transformers' Blip2 classes hold)."""
    dinov2_vision: Path
    """A Dinov2 ViT (which they cannot hold)."""
    bert: Path
    """A 4-layer BERT with its caption tokenizer."""
    llm: Path
    """A Llama with the SmolLM2 tokenizer and 64 spare embedding rows, as OPT or Qwen have."""


@pytest.fixture(scope="session")
def towers(tmp_path_factory) -> Towers:
    root = tmp_path_factory.mktemp("towers")
    # Blip2VisionConfig's default init (1e-10) makes a tower that ignores its input image.
    blip2 = save_vision_tower("blip2", root / "blip2", initializer_range=0.02)
    return Towers(blip2, save_vision_tower("dinov2", root / "dinov2"), save_bert(root / "bert"),
                  _save_llm_with_spare_rows(root / "llm"))


def _save_llm_with_spare_rows(out: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer(TINY_LLAMA))
    torch.manual_seed(0)
    # A wide init makes greedy captions vary from image to image and from token to token.
    config = LlamaConfig(vocab_size=len(tokenizer) + 64, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=128, initializer_range=0.2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


