"""Reading selected tensors from a transformers model folder or hub repo, never the whole model.

A BLIP-2 checkpoint holds a frozen vision tower, a Q-Former and a frozen LLM in one set of weight
files. The vision tower (``pipeline.model.vision``) and the Q-Former side (``init_from``, see
``pipeline.checkpoint.sources``) are each read from it alone: only the shards that the
checkpoint's index lists for the wanted names are opened (and, for a hub id, fetched), and only
the wanted tensors are read from them.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from safetensors import safe_open
from transformers.utils import cached_file

# Weight files in the order transformers prefers them: (sharded index, single file).
_WEIGHT_FILES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


class MissingWeightsError(RuntimeError):
    """A model folder or hub repo holds no weights file transformers would load."""


def optional_file(path: str, filename: str) -> str | None:
    """Local path of ``filename`` in a model folder or hub repo (cached), or None if absent."""
    return cached_file(
        path,
        filename,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )


def read_weights(
    path: str, select: Callable[[str], bool], *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint whose names ``select`` accepts.

    Args:
        path: A local model folder or a hub id (read from the cache when offline).
        select: Whether a tensor name is wanted.
        dtype: Floating-point tensors are cast to it as they are read (halving the peak memory
            of an fp32 checkpoint loaded in 16 bits); None keeps the stored dtype.

    Returns:
        The selected tensors by their names in the checkpoint; empty when none is selected.

    Raises:
        MissingWeightsError: ``path`` holds no safetensors or PyTorch weights file.
    """
    state = {}
    for file in _weight_files_with(path, select):
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt") as reader:
                for key in reader.keys():
                    if select(key):
                        state[key] = _cast(reader.get_tensor(key), dtype)
        else:
            # mmap: tensors that are not selected are never read from disk.
            weights = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            for key, tensor in weights.items():
                if select(key):
                    state[key] = _cast(tensor, dtype)
            del weights
    return state


def read_prefixed_weights(
    path: str, prefix: str, *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefix`` (see :func:`read_weights`), with the prefix
    removed: e.g. a BLIP-2 checkpoint's vision tower without its language model ever loaded."""
    selected = read_weights(path, lambda key: key.startswith(prefix), dtype=dtype)
    return {key[len(prefix):]: tensor for key, tensor in selected.items()}


def _weight_files_with(path: str, select: Callable[[str], bool]) -> list[str]:
    """Local paths of the weight files of ``path`` that may hold names ``select`` accepts."""
    for index_name, single_name in _WEIGHT_FILES:
        index = optional_file(path, index_name)
        if index is not None:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted({shard for key, shard in weight_map.items() if select(key)})
            return [cached_file(path, shard) for shard in shards]
        single = optional_file(path, single_name)
        if single is not None:
            return [single]
    raise MissingWeightsError(f"{path}: no model.safetensors or pytorch_model.bin (single or sharded)")


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)
