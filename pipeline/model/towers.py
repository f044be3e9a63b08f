"""The one way a model's frozen towers are loaded: once per node, mapped by every worker.

Training builds the model in every Ray Train worker, and the checkpoint rebuild, evaluation and
export build it again; all of them take their towers from :func:`load_frozen_towers`. A tower
with weights is built once per node (:mod:`pipeline.model.node_weights`) into
``cache_dir()/towers/<key>.safetensors``, in its spec's dtype, and mapped by every process; the
key changes with the tower's spec, its checkpoint's files (names, sizes, modification times) and
the torch and transformers versions, so a changed checkpoint is never served from an old file.
A ``config:`` architecture's random tower, and any tower built without weights (on the meta
device, for shapes), is built in the process as before.

Loading a tower draws no random numbers the caller sees: torch's generator is forked around it
(transformers' loading of an LLM draws some, building a skeleton may, and only one process on a
node builds the tower), so the trainable modules draw the same initial weights on every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path

import torch
import transformers
from torch import nn

from pipeline.assets import cache_dir, is_config_only, resolve_model
from pipeline.model.frozen import FrozenTowers, freeze
from pipeline.model.llm import load_language_model
from pipeline.model.node_weights import node_shared_module
from pipeline.model.vision import load_vision_tower
from pipeline.model.weight_files import optional_file
from pipeline.spec.losses import Objective
from pipeline.spec.model import LLMSpec, ModelSpec, VisionTowerSpec

_LOADERS = {"vision": load_vision_tower, "llm": load_language_model}


def load_frozen_towers(spec: ModelSpec, objective: Objective, *, weights: bool = True) -> FrozenTowers:
    """The frozen towers of a model of ``objective``: the vision tower, and the LLM for objective 2.

    Args:
        spec: The model spec.
        objective: 1 or 2.
        weights: False builds the towers from their configs alone (see ``load_vision_tower``).

    Returns:
        The towers, frozen, in their specs' dtypes.
    """
    vision = load_tower("vision", spec.vision, weights=weights)
    llm = load_tower("llm", spec.llm, weights=weights) if objective == 2 else None
    return FrozenTowers(vision, llm)


def load_tower(role: str, spec: VisionTowerSpec | LLMSpec, *, weights: bool = True) -> nn.Module:
    """One frozen tower (``role`` ``vision`` or ``llm``), its weights mapped from the node's
    file when it has weights to read; torch's random generator is left as it was."""
    load = _LOADERS[role]
    with torch.random.fork_rng(devices=[]):
        if not weights or is_config_only(spec.name):
            return load(spec, weights=weights)
        return freeze(node_shared_module(
            tower_file(role, spec), build=partial(load, spec), skeleton=partial(load, spec, weights=False),
        ))


def tower_file(role: str, spec: VisionTowerSpec | LLMSpec) -> Path:
    """The node-local file a tower's weights are mapped from (it may not exist yet)."""
    identity = {
        "role": role,
        "spec": spec.model_dump(mode="json"),
        "files": _checkpoint_files(resolve_model(spec.name)),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "towers" / f"{role}-{key}.safetensors"


def _checkpoint_files(path: str) -> list[tuple[str, int, int]]:
    """Name, size and modification time of each file beside the checkpoint's ``config.json``."""
    config = optional_file(path, "config.json")
    if config is None:
        return []
    folder = Path(config).parent
    stats = [(entry.name, entry.stat()) for entry in os.scandir(folder) if entry.is_file()]
    return sorted((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats)
