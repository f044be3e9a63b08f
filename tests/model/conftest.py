"""Session-wide tiny checkpoints for the model tests."""

from __future__ import annotations

import pytest

from tests.helpers import one_thread  # noqa: F401 (autouse)

from .tiny import save_bert, save_llm, save_vision_tower


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    """A tiny BERT masked LM (4 layers, hidden 32) with a caption WordPiece tokenizer."""
    return save_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def vision_dirs(tmp_path_factory):
    """Tiny vision towers by kind, built on first use."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = save_vision_tower(kind, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def llm_dirs(tmp_path_factory):
    """Tiny causal LMs by kind, built on first use."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = save_llm(kind, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get
