"""The prepared-shard contract: what ``qformer prep`` writes and training, evaluation and the
benchmarks read. Its column names, its manifest and its token columns live here and nowhere else.

A prep output folder holds, per input shard ``NAME``, ``NAME.parquet`` (one row per kept
sample) and ``NAME.stats.json``, and for the whole run ``manifest.json`` (spec, tokenizers,
totals, drops by reason, the shards in corpus order).

Why Parquet rather than WebDataset tars: training reads these shards itself
(``pipeline.train.loader``), one row group at a time through byte-range reads, and columnar
storage lets it read only the columns a stage needs (objective 2 skips the Q-Former tokens).
Token ids are fixed-size integer lists, so a batch becomes a tensor without parsing. Images stay
JPEG bytes: decoding is cheap at the prepared size.
"""

from __future__ import annotations

import json
import logging
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UsageError
from pipeline.io.storage import Location, read_bytes
from pipeline.spec.losses import Objective

log = logging.getLogger("qformer.data")

MANIFEST = "manifest.json"
"""The prep run's manifest, in the output folder."""

KEY, SOURCE, CAPTION, IMAGE = "key", "source", "caption", "image"
"""Columns every prepared shard has: the sample key, its input shard, the clean caption and the
prepared JPEG."""

TextKind = Literal["qformer", "llm"]
"""Whose tokens: the Q-Former's BERT WordPiece ids, or the frozen LLM's."""

TOKEN_COLUMNS: dict[TextKind, tuple[str, str]] = {
    "qformer": ("qformer_input_ids", "qformer_attention_mask"),
    "llm": ("llm_input_ids", "llm_attention_mask"),
}
"""The (ids, mask) columns of each text kind."""

MODEL_INPUTS: dict[TextKind, tuple[str, str]] = {
    "qformer": ("input_ids", "attention_mask"),
    "llm": ("llm_input_ids", "llm_attention_mask"),
}
"""The model's keyword arguments the (ids, mask) columns of each text kind become."""


def text_kind(objective: Objective) -> TextKind:
    """The tokens a model of ``objective`` reads: the Q-Former's (1) or the LLM's (2)."""
    return "qformer" if objective == 1 else "llm"


def output_schema(qformer_length: int, llm_length: int | None) -> pa.Schema:
    """Schema of a prepared shard for the configured token lengths."""
    fields = [
        pa.field(KEY, pa.string()),
        pa.field(SOURCE, pa.string()),
        pa.field(CAPTION, pa.string()),
        pa.field(IMAGE, pa.binary()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("metadata", pa.string()),
    ]
    lengths: dict[TextKind, int | None] = {"qformer": qformer_length, "llm": llm_length}
    for kind, length in lengths.items():
        if length is not None:
            ids, mask = TOKEN_COLUMNS[kind]
            fields += [pa.field(ids, pa.list_(pa.int32(), length)), pa.field(mask, pa.list_(pa.int8(), length))]
    return pa.schema(fields)


def fixed_list(values: np.ndarray, length: int, value_type: pa.DataType) -> pa.FixedSizeListArray:
    """An (N, length) numpy array as a fixed-size list column."""
    flat = pa.array(values.reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, length)


def token_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size list column -> (N, L) int64 array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = array.flatten().to_numpy(zero_copy_only=False)  # (N * L,)
    return values.astype(np.int64).reshape(-1, array.type.list_size)


def shards_from_manifest(manifest: Location) -> tuple[Location, ...]:
    """The prepared shards listed in a prep run's ``manifest.json``, in corpus order.

    Args:
        manifest: The manifest file; its storage options are used for the shards too.

    Raises:
        ValueError: the manifest lists no shard.
    """
    data = json.loads(read_bytes(manifest))
    shards = tuple(Location(entry["output"], manifest.options) for entry in data.get("shards", []))
    if not shards:
        raise ValueError(f"{manifest.url}: the manifest lists no prepared shard")
    if data.get("failed_shards"):
        log.warning("%s: %d shard(s) failed in prep and are not used",
                    manifest.url, len(data["failed_shards"]))
    return shards


class PreparedDataError(UsageError):
    """A file that should be a prepared shard cannot be read as one."""


def read_schema(shard: Location) -> pa.Schema:
    """The Arrow schema of a prepared shard (its footer only).

    Raises:
        PreparedDataError: the file is not a readable Parquet file.
    """
    fs, path = shard.filesystem()
    try:
        with fs.open(path, "rb") as handle:
            return pq.read_schema(handle)
    except (pa.ArrowException, OSError) as err:
        raise PreparedDataError(f"{shard.url}: not a readable prepared shard ({err})") from None


def read_rows(shards: tuple[Location, ...], columns: list[str], limit: int | None = None) -> pa.Table:
    """The first ``limit`` rows (all when None) of the shards, in corpus order.

    Raises:
        PreparedDataError: a shard is not a readable Parquet file with these columns.
    """
    tables, rows = [], 0
    for shard in shards:
        fs, path = shard.filesystem()
        try:
            with fs.open(path, "rb") as handle:
                table = pq.read_table(handle, columns=columns)
        except (pa.ArrowException, OSError) as err:
            raise PreparedDataError(f"{shard.url}: not a readable prepared shard ({err})") from None
        tables.append(table)
        rows += table.num_rows
        if limit is not None and rows >= limit:
            break
    table = pa.concat_tables(tables)
    return table if limit is None else table.slice(0, limit)
