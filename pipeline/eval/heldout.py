"""The held-out set of an evaluation: its prepared shards, its caption gallery, model inputs.

Held-out data is prepared by ``qformer prep`` with the same image and tokenizer settings as the
training data; the images are only resized (no augmentation) when they become model inputs.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.data.augment import TrainTransform
from pipeline.data.batches import InputBuilder, PixelNormalizer, to_device
from pipeline.data.prepared import (
    CAPTION,
    IMAGE,
    KEY,
    MANIFEST,
    TOKEN_COLUMNS,
    read_rows,
    read_schema,
    shards_from_manifest,
    text_kind,
    token_matrix,
)
from pipeline.errors import UsageError
from pipeline.io.storage import Location, exists, expand_inputs, read_bytes
from pipeline.model.vision import ImagePreprocessing
from pipeline.spec.losses import Objective
from pipeline.spec.storage import StorageSpec


class EvalError(UsageError, RuntimeError):
    """An evaluation cannot run as asked (no such checkpoint or data, mismatched tokens)."""


@dataclass(frozen=True)
class HeldOutData:
    """Prepared shards to evaluate on.

    Attributes:
        shards: The ``.parquet`` shards, in corpus order.
        manifest: The prep manifest when the data was given as a prep output folder.
        source: What was asked for, for reports.
    """

    shards: tuple[Location, ...]
    manifest: dict | None
    source: str


def resolve_data(data: list[str], split: str | None = None, storage: StorageSpec | None = None) -> HeldOutData:
    """Find the prepared shards of ``data``.

    Args:
        data: Prep output folders (holding ``manifest.json``) or ``.parquet`` paths/globs,
            local or ``s3://``.
        split: A sub-folder of each folder that holds the prep output of that split, e.g.
            ``test`` for ``DATA/test/manifest.json``; None uses the folders themselves.
        storage: Endpoint options of ``s3://`` data.

    Raises:
        EvalError: a folder without a manifest, a pattern matching nothing, or no shard at all.
    """
    shards: list[Location] = []
    manifest = None
    for entry in data:
        folder = Location.of(entry, storage)
        if split:
            folder = folder.child(split)
        if exists(folder.child(MANIFEST)):
            manifest = json.loads(read_bytes(folder.child(MANIFEST)))
            try:
                shards.extend(shards_from_manifest(folder.child(MANIFEST)))
            except ValueError as err:
                raise EvalError(str(err)) from None
        elif split or not entry.rstrip("/").endswith((".parquet", "*")):
            raise EvalError(f"data: {folder.url} has no {MANIFEST} (not a `qformer prep` output folder)")
        else:
            try:
                shards.extend(expand_inputs([entry], storage))
            except FileNotFoundError as err:
                raise EvalError(f"data: {err}") from None
    if not shards:
        raise EvalError("data: no prepared shard given")
    source = ", ".join(f"{d.rstrip('/')}/{split}" if split else d for d in data)
    return HeldOutData(tuple(shards), manifest, source)


def check_tokens(data: HeldOutData, objective: Objective, max_text_length: int) -> None:
    """Refuse held-out data whose token columns the model cannot use.

    Raises:
        EvalError: a missing token column or a Q-Former token length other than the model's.
    """
    text = text_kind(objective)
    schema = read_schema(data.shards[0])
    missing = [c for c in (KEY, CAPTION, IMAGE, *TOKEN_COLUMNS[text]) if c not in schema.names]
    if missing:
        raise EvalError(f"data: {data.shards[0].url} has no column(s) {missing}; prepare the held-out "
                        f"set with the training data's tokenizers")
    if text == "qformer":
        length = schema.field(TOKEN_COLUMNS["qformer"][0]).type.list_size
        if length != max_text_length:
            raise EvalError(f"data: Q-Former tokens of length {length}, but the model was trained "
                            f"with max_text_length {max_text_length}")


@dataclass(frozen=True)
class CaptionGallery:
    """The distinct captions of a held-out set, in first-seen order, with their Q-Former tokens.

    Attributes:
        captions: (C,) the distinct caption strings.
        input_ids: (C, T) their ``[CLS] caption [SEP]`` ids.
        attention_mask: (C, T) their masks.
        counts: (C,) how many held-out samples carry each caption.
    """

    captions: tuple[str, ...]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    counts: np.ndarray

    @classmethod
    def read(cls, shards: tuple[Location, ...]) -> "CaptionGallery":
        """The gallery of every row of ``shards``."""
        table = read_rows(shards, [CAPTION, *TOKEN_COLUMNS["qformer"]])
        captions = table.column(CAPTION).to_pylist()
        first: dict[str, int] = {}
        for row, caption in enumerate(captions):
            first.setdefault(caption, row)
        rows = np.fromiter(first.values(), np.int64, len(first))
        counts = np.zeros(len(first), np.int64)
        index = {caption: i for i, caption in enumerate(first)}
        np.add.at(counts, [index[c] for c in captions], 1)
        ids, mask = (token_matrix(table.column(c)) for c in TOKEN_COLUMNS["qformer"])
        return cls(tuple(first), ids[rows], mask[rows], counts)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {caption: i for i, caption in enumerate(self.captions)}

    def index_of(self, captions: list[str]) -> np.ndarray:
        """(N,) gallery index of each caption.

        Raises:
            KeyError: a caption is not in the gallery.
        """
        return np.array([self._index[c] for c in captions], np.int64)

    def to_json(self) -> dict:
        """The gallery as plain lists (it travels to Ray Data actors as a constructor argument)."""
        return {"captions": list(self.captions), "input_ids": self.input_ids.tolist(),
                "attention_mask": self.attention_mask.tolist(), "counts": self.counts.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> "CaptionGallery":
        return cls(tuple(data["captions"]), np.asarray(data["input_ids"], np.int64),
                   np.asarray(data["attention_mask"], np.int64), np.asarray(data["counts"], np.int64))


class EvalInputs:
    """Held-out rows -> model inputs of an objective on a device: images resized (no
    augmentation) and normalised for the vision tower, and the objective's tokens.

    Args:
        preprocessing: The vision tower's image size and normalisation.
        objective: Whose tokens: the Q-Former's (1) or the LLM's (2).
    """

    def __init__(self, preprocessing: ImagePreprocessing, objective: Objective):
        transform = TrainTransform(preprocessing.image_size, augment=False)
        self.build = InputBuilder(transform, text_kind(objective))
        self.normalizer = PixelNormalizer(preprocessing.mean, preprocessing.std)

    def __call__(self, rows: pa.Table, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return to_device(self.build(rows), device, self.normalizer)
