"""The training-ready shard format: Parquet, one row per sample.

Why Parquet rather than WebDataset tars: training streams these shards through Ray Data,
whose Parquet reader is columnar and vectorised (no per-sample DataFrame as in its WebDataset
reader), reads only the columns a stage needs (stage 2 skips the Q-Former tokens), and splits
work by row group. Token ids are fixed-size integer lists, so a batch becomes a tensor without
parsing. Images stay JPEG bytes: decoding is cheap at the prepared size.
"""

from __future__ import annotations

import pyarrow as pa

def output_schema(qformer_length: int, llm_length: int | None) -> pa.Schema:
    """Schema of a prepared shard for the configured token lengths."""
    fields = [
        pa.field("key", pa.string()),
        pa.field("source", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("metadata", pa.string()),
        pa.field("qformer_input_ids", pa.list_(pa.int32(), qformer_length)),
        pa.field("qformer_attention_mask", pa.list_(pa.int8(), qformer_length)),
    ]
    if llm_length is not None:
        fields += [
            pa.field("llm_input_ids", pa.list_(pa.int32(), llm_length)),
            pa.field("llm_attention_mask", pa.list_(pa.int8(), llm_length)),
        ]
    return pa.schema(fields)


def fixed_list(values, length: int, value_type: pa.DataType) -> pa.FixedSizeListArray:
    """An (N, length) numpy array as a fixed-size list column."""
    flat = pa.array(values.reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, length)
