"""The per-sample status table written beside each output shard (``PROVENANCE_SCHEMA``).

Every input sample of a shard gets one row: kept, or the reason it was dropped, with what the
decision rests on (hashes, the sample it duplicates, scores, candidate captions). A user asks
why a sample is missing with, e.g.::

    import pyarrow.dataset as ds
    ds.dataset("OUT/provenance").to_table(filter=ds.field("key") == "000000123").to_pylist()
"""

from __future__ import annotations

from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.prepared import PROVENANCE_SCHEMA

_FLUSH_ROWS = 4096


class ProvenanceWriter:
    """Streams provenance rows into a Parquet file, a row group at a time.

    Args:
        handle: A writable binary file (an :func:`~pipeline.io.storage.atomic_write` handle).
    """

    def __init__(self, handle: IO[bytes]):
        self._writer = pq.ParquetWriter(handle, PROVENANCE_SCHEMA, compression="zstd")
        self._rows: dict[str, list] = {name: [] for name in PROVENANCE_SCHEMA.names}
        self.counts: dict[str, int] = {}

    def add(self, key: str, source: str, status: str, *, duplicate_of: str | None = None,
            content_hash: str | None = None, image_hash: bytes | None = None,
            best_score: float | None = None, captions: list[dict] | None = None) -> None:
        """One sample's row; ``captions`` are ``{"text", "origin", "score", "kept"}`` mappings."""
        values = {"key": key, "source": source, "status": status, "duplicate_of": duplicate_of,
                  "content_hash": content_hash, "image_hash": image_hash.hex() if image_hash else None,
                  "best_score": best_score, "captions": captions}
        for name, value in values.items():
            self._rows[name].append(value)
        self.counts[status] = self.counts.get(status, 0) + 1
        if len(self._rows["key"]) >= _FLUSH_ROWS:
            self._flush()

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def _flush(self) -> None:
        if self._rows["key"]:
            self._writer.write_table(pa.table(self._rows, schema=PROVENANCE_SCHEMA))
            self._rows = {name: [] for name in PROVENANCE_SCHEMA.names}
