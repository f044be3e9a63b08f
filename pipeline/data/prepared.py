"""The prepared-shard contract: what ``qformer prep`` writes and training, evaluation and the
benchmarks read. Its column names, its manifest and its token columns live here and nowhere else.

A prep (or curate) output folder holds, per input shard ``NAME``, ``NAME.parquet`` (one row per
kept sample), ``provenance/NAME.parquet`` (one row per input sample: kept, or why not) and
``NAME.stats.json``, and for the whole run ``manifest.json`` (spec, tokenizers, totals, drops by
reason, the shards in corpus order).

Curated shards (``qformer curate``) may hold several captions per image: the single-caption
columns then carry the best one (so evaluation reads curated shards like any others), and the
``captions`` list columns every kept caption with its tokens; training draws one per sample at
each step. Prep's single-caption shards stay valid training input unchanged.

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
SAMPLE_FIELDS = (
    pa.field(KEY, pa.string()),
    pa.field(SOURCE, pa.string()),
    pa.field(CAPTION, pa.string()),
    pa.field(IMAGE, pa.binary()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("metadata", pa.string()),
)
"""The columns of a prepared shard besides its tokens (``metadata``: the input's JSON)."""

CAPTIONS, CAPTION_ORIGINS, CAPTION_SCORES, CAPTION_COUNT = (
    "captions", "caption_origins", "caption_scores", "caption_count")
"""Multi-caption columns of curated shards: every kept caption (best first), where each came from
(``web`` or ``synthetic``), its ranking score, and how many there are."""
WEB, SYNTHETIC = "web", "synthetic"
"""Caption origins: the sample's own (web) caption, or one a captioning model wrote."""

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


MULTI_TOKEN_COLUMNS: dict[TextKind, tuple[str, str]] = {
    "qformer": ("qformer_captions_input_ids", "qformer_captions_attention_mask"),
    "llm": ("llm_captions_input_ids", "llm_captions_attention_mask"),
}
"""The (ids, mask) columns of every kept caption of a curated shard: lists (one entry per caption)
of fixed-size token lists."""


def text_kind(objective: Objective) -> TextKind:
    """The tokens a model of ``objective`` reads: the Q-Former's (1) or the LLM's (2)."""
    return "qformer" if objective == 1 else "llm"


def output_schema(qformer_length: int, llm_length: int | None) -> pa.Schema:
    """Schema of a prepared shard for the configured token lengths."""
    fields = list(SAMPLE_FIELDS)
    lengths: dict[TextKind, int | None] = {"qformer": qformer_length, "llm": llm_length}
    for kind, length in lengths.items():
        if length is not None:
            ids, mask = TOKEN_COLUMNS[kind]
            fields += [pa.field(ids, pa.list_(pa.int32(), length)), pa.field(mask, pa.list_(pa.int8(), length))]
    return pa.schema(fields)


def curated_schema(qformer_length: int, llm_length: int | None) -> pa.Schema:
    """Schema of a curated shard: a prepared shard's columns (the best caption) plus every kept
    caption, its origin, score and tokens."""
    fields = list(output_schema(qformer_length, llm_length))
    fields += [pa.field(CAPTIONS, pa.list_(pa.string())), pa.field(CAPTION_ORIGINS, pa.list_(pa.string())),
               pa.field(CAPTION_SCORES, pa.list_(pa.float32())), pa.field(CAPTION_COUNT, pa.int32())]
    lengths: dict[TextKind, int | None] = {"qformer": qformer_length, "llm": llm_length}
    for kind, length in lengths.items():
        if length is not None:
            ids, mask = MULTI_TOKEN_COLUMNS[kind]
            fields += [pa.field(ids, pa.list_(pa.list_(pa.int32(), length))),
                       pa.field(mask, pa.list_(pa.list_(pa.int8(), length)))]
    return pa.schema(fields)


def has_multiple_captions(schema: pa.Schema, kind: TextKind) -> bool:
    """Whether shards of ``schema`` hold every kept caption's tokens of ``kind`` (curated shards)."""
    return all(name in schema.names for name in MULTI_TOKEN_COLUMNS[kind])


def pick_captions(rows: pa.Table, kind: TextKind, draws: np.ndarray) -> pa.Table:
    """``rows`` of a curated shard with the single-caption token columns of ``kind`` replaced by
    caption ``draws[i] % count`` of each row (``draws``: (N,) non-negative integers)."""
    for multi, single in zip(MULTI_TOKEN_COLUMNS[kind], TOKEN_COLUMNS[kind]):
        lists = rows.column(multi).combine_chunks()  # N lists of (L,) token lists
        offsets = lists.offsets.to_numpy()  # (N + 1,) into lists.values, which ignores slicing
        counts = np.diff(offsets)  # (N,)
        if (counts < 1).any():
            raise ValueError(f"{multi}: a curated row holds no caption")
        chosen = offsets[:-1] + draws % counts  # (N,)
        rows = _set_column(rows, single, lists.values.take(pa.array(chosen)))
    return rows


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


PROVENANCE_DIR = "provenance"
"""Folder of the per-sample status tables, in a prep or curate output folder."""
KEPT = "kept"
"""The status of a sample that is in the output shard; any other status is a drop reason."""
CAPTION_CANDIDATE = pa.struct([("text", pa.string()), ("origin", pa.string()), ("score", pa.float32()),
                               ("kept", pa.bool_())])
PROVENANCE_SCHEMA = pa.schema([
    pa.field(KEY, pa.string()),
    pa.field(SOURCE, pa.string()),
    pa.field("status", pa.string()),
    pa.field("duplicate_of", pa.string()),
    pa.field("content_hash", pa.string()),
    pa.field("image_hash", pa.string()),
    pa.field("best_score", pa.float32()),
    pa.field("captions", pa.list_(CAPTION_CANDIDATE)),
])
"""One row per input sample: its key and input shard, ``kept`` or the drop reason, the sample it
duplicates (exactly: ``duplicate``, perceptually: ``near_duplicate``), its content hash and
perceptual hash (hex), its best ranking score, and every candidate caption with where it came
from, its score and whether it was kept."""


def provenance_location(output_dir: Location, shard_name: str) -> Location:
    """The provenance table of the output shard ``shard_name``."""
    return output_dir.child(PROVENANCE_DIR, shard_name + ".parquet")


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


def count_rows(shards: tuple[Location, ...], up_to: int | None = None) -> int:
    """How many rows the shards hold, read from their footers in corpus order; with ``up_to``,
    the count stops at the first shard that reaches it (a large folder on object storage is
    not read footer by footer).

    Raises:
        PreparedDataError: a shard is not a readable Parquet file.
    """
    total = 0
    for shard in shards:
        fs, path = shard.filesystem()
        try:
            with fs.open(path, "rb") as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
        except (pa.ArrowException, OSError) as err:
            raise PreparedDataError(f"{shard.url}: not a readable prepared shard ({err})") from None
        if up_to is not None and total >= up_to:
            break
    return total


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
