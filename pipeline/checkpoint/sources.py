"""Where a new stage's weights come from (``init_from``): recognising a source and reading it.

A source is one of three kinds, recognised by what is there:

- ``checkpoint``: a checkpoint folder written by training, a finished stage folder, or a
  ``qformer export --format own`` folder (local or ``s3://``): its ``trainable.safetensors``,
  already under our names;
- ``transformers``: a transformers Blip2 model folder (``config.json`` of ``model_type`` blip-2)
  or a hub id such as ``Salesforce/blip2-opt-2.7b``: only its non-frozen tensors are read (the
  LLM's shards are never opened), plus the pretraining-only tensors a ``qformer export`` keeps
  beside them, then renamed by :mod:`pipeline.model.adapters.transformers_blip2`;
- ``lavis``: a ``.pth`` file with LAVIS's key names (local or ``s3://``), renamed by
  :mod:`pipeline.model.adapters.lavis`. It is read with ``weights_only=True``: unpickling
  arbitrary objects would run code from the file.

What reads as weights here is matched against a model in :mod:`pipeline.checkpoint.initial`.
"""

from __future__ import annotations

import io
import pickle
import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from pipeline.checkpoint.format import TRAINABLE, CheckpointError, load_trainable_weights
from pipeline.checkpoint.lookup import find_checkpoint
from pipeline.io.redact import redact_url
from pipeline.io.storage import Location, exists, read_bytes, storage_error, storage_errors
from pipeline.model.adapters.lavis import from_lavis
from pipeline.model.adapters.transformers_blip2 import PRETRAINING_FILE, from_transformers, our_name
from pipeline.model.parts import is_frozen_tower
from pipeline.model.weight_files import MissingWeightsError, optional_file, read_weights
from pipeline.spec.storage import StorageSpec

SourceKind = Literal["checkpoint", "transformers", "lavis"]

_KIND_NAMES = {
    "checkpoint": "qformer-pipeline checkpoint",
    "transformers": "transformers Blip2 model",
    "lavis": "LAVIS checkpoint",
}
# What a hub id looks like: owner/name, nothing else.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_BLIP2_MODEL_TYPE = "blip-2"


class InitError(CheckpointError):
    """An ``init_from`` source cannot be found or read, or does not fit the stage's model."""


@dataclass(frozen=True)
class InitSource:
    """The weights a new stage starts from, and what may differ between them and its model.

    Attributes:
        kind: What the source is (see the module docstring).
        where: A checkpoint folder URL, a ``.pth`` URL, a local model folder or a hub id.
        options: fsspec options for an ``s3://`` URL.
        allow_missing: Glob patterns of the model's tensors that may start from its
            initialisation (the stage's ``init_from_allow_missing``).
        allow_unexpected: Glob patterns of the source's tensors that may be left out
            (``init_from_allow_unexpected``).
    """

    kind: SourceKind
    where: str
    options: dict = field(default_factory=dict)
    allow_missing: tuple[str, ...] = ()
    allow_unexpected: tuple[str, ...] = ()

    def describe(self) -> str:
        """What and where the source is, for logs and errors."""
        return f"{_KIND_NAMES[self.kind]} {redact_url(self.where)}"

    def to_config(self) -> dict:
        """A JSON-able form, for ``train_loop_config``."""
        return {"kind": self.kind, "where": self.where, "options": self.options,
                "allow_missing": list(self.allow_missing), "allow_unexpected": list(self.allow_unexpected)}

    @classmethod
    def from_config(cls, config: dict) -> "InitSource":
        return cls(config["kind"], config["where"], config["options"],
                   tuple(config["allow_missing"]), tuple(config["allow_unexpected"]))


def resolve_init_source(
    name: str,
    storage: StorageSpec | None = None,
    *,
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
) -> InitSource:
    """Recognise the source ``name`` stands for (a folder, a ``.pth`` file or a hub id).

    Args:
        name: A local path, an ``s3://`` URL or a hub id.
        storage: Endpoint options for ``s3://``.
        allow_missing: See :class:`InitSource`.
        allow_unexpected: See :class:`InitSource`.

    Raises:
        InitError: Nothing there, or nothing of the three kinds.
        StorageError: The storage cannot be reached or refuses access.
    """
    location = Location.of(name, storage)
    allow = {"allow_missing": tuple(allow_missing), "allow_unexpected": tuple(allow_unexpected)}
    fs, path = location.filesystem()
    with storage_errors(location.url):
        try:
            kind = fs.info(path)["type"]
        except FileNotFoundError as err:
            if storage_error(err, location.url) is not None:  # a missing bucket, say
                raise
            kind = None
    if kind == "file":
        if not name.endswith(".pth"):
            raise InitError(f"{redact_url(location.url)} is a file but not a .pth checkpoint")
        return InitSource("lavis", location.url, location.options, **allow)
    if kind == "directory":
        if location.is_local and fs.exists(f"{path}/config.json"):
            return InitSource("transformers", _blip2_model(location.url), **allow)
        if exists(location.child(TRAINABLE)):
            return InitSource("checkpoint", location.url, location.options, **allow)
        try:
            checkpoint = find_checkpoint(location)
        except CheckpointError as err:
            raise InitError(f"{err} (nor a transformers model folder: no config.json)") from None
        return InitSource("checkpoint", checkpoint.location.url, location.options, **allow)
    if location.is_local and _HUB_ID.match(name):
        return InitSource("transformers", _blip2_model(name), **allow)
    raise InitError(f"{redact_url(location.url)}: no such file or folder")


def _blip2_model(where: str) -> str:
    """``where`` (a local folder or hub id) once it is known to hold a BLIP-2 model."""
    try:
        config = AutoConfig.from_pretrained(where)
    except (OSError, ValueError) as err:
        raise InitError(f"{where}: no such file or folder, and not a transformers model that can "
                        f"be loaded ({str(err).splitlines()[0]})") from None
    if config.model_type != _BLIP2_MODEL_TYPE:
        raise InitError(f"{where} is a transformers {config.model_type!r} model, not a BLIP-2 one")
    return where


def read_source_weights(source: InitSource) -> dict[str, torch.Tensor]:
    """The source's tensors under our names (frozen-tower ones included where the file holds
    them; a transformers source's are never read).

    Raises:
        InitError: The source cannot be read.
    """
    if source.kind == "checkpoint":
        return load_trainable_weights(Location(source.where, source.options))
    if source.kind == "transformers":
        return _read_transformers(source.where)
    return from_lavis(_read_lavis(Location(source.where, source.options)))


def _read_transformers(where: str) -> dict[str, torch.Tensor]:
    try:
        state = read_weights(where, lambda key: not is_frozen_tower(our_name(key)))
    except MissingWeightsError as err:
        raise InitError(str(err)) from None
    beside = optional_file(where, PRETRAINING_FILE)
    return from_transformers(state, load_file(beside) if beside else None)


def _read_lavis(location: Location) -> dict[str, torch.Tensor]:
    where = redact_url(location.url)
    data = location.url if location.is_local else io.BytesIO(read_bytes(location))
    try:
        checkpoint = torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InitError(f"{where}: refused to load: it holds objects other than tensors, which "
                        f"would run code from the file ({str(err).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise InitError(f"{where}: not a readable PyTorch checkpoint ({str(err).splitlines()[0]})") from None
    # LAVIS saves {"model": state_dict, "optimizer": ..., "config": ..., ...}.
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise InitError(f"{where}: not a state dict of tensors (nor one under 'model', as LAVIS saves it)")
    return state
