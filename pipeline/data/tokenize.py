"""Batched caption tokenization with Hugging Face fast tokenizers.

Q-Former side: ``[CLS] caption [SEP]``. LLM side: the tokenizer's own special tokens, then the
caption, then end-of-text (the target the stage-2 LM loss ends on). Both are truncated and
right-padded to a fixed length, with attention masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.assets import resolve_tokenizer
from pipeline.spec.prep import TokenizerSpec


@dataclass
class TokenBatch:
    input_ids: np.ndarray
    """(N, L) int32, right-padded."""
    attention_mask: np.ndarray
    """(N, L) int8, 1 on real tokens."""


class CaptionTokenizer:
    """A fast tokenizer with the padding/truncation/end-of-text rules of one tower."""

    def __init__(self, spec: TokenizerSpec, append_eos: bool):
        from transformers import AutoTokenizer

        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_tokenizer(spec.name))
        if not self.tokenizer.is_fast:
            raise ValueError(f"tokenizer {spec.name!r} has no fast implementation")
        self.append_eos = append_eos
        if append_eos and self.tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {spec.name!r} has no end-of-text token")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id or 0

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __call__(self, captions: list[str]) -> TokenBatch:
        length = self.spec.max_length
        budget = length - 1 if self.append_eos else length
        encoded = self.tokenizer(captions, truncation=True, max_length=budget, padding=False)
        ids = np.full((len(captions), length), self.pad_id, dtype=np.int32)  # (N, L)
        mask = np.zeros((len(captions), length), dtype=np.int8)  # (N, L)
        for row, tokens in enumerate(encoded["input_ids"]):
            if self.append_eos:
                tokens = [*tokens, self.tokenizer.eos_token_id]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return TokenBatch(ids, mask)

    def decode(self, ids, mask) -> str:
        """The text of one row, without special tokens or padding."""
        kept = [int(i) for i, m in zip(ids, mask) if m]
        return self.tokenizer.decode(kept, skip_special_tokens=True)
