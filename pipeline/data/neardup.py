"""Near-duplicate images across the whole corpus, for ``qformer prep`` and ``qformer curate``.

1. Index: every shard writes the perceptual hash of each of its images (``HASH_FIELDS``: corpus
   order, shard, key, hash and, when flips count, the mirror image's hash) into a Parquet file.
2. Find: each image with an earlier near duplicate (``pipeline.data.phash``) is a later copy; the
   earliest such duplicate is recorded as what it duplicates. Up to ``driver_max_rows`` images
   this runs in the driver; above, on Ray Data: each hash is emitted once per LSH band with the
   band's bits as its key, the rows are hash-partitioned on (band, key) so that a block holds
   whole band groups, and each block yields its later copies (an image may be found in several
   bands: a reader keeps the earliest).
3. The later copies are written as Parquet partitioned by shard (``key``, ``duplicate_of``,
   ``duplicate_order``), then ``_SUCCESS`` naming the shards searched.

The result depends only on the hashes and their corpus order, so a resumed run drops the same
images. A shard indexed only after the search (its first read failed) is searched again with
an order after every other shard's (``LATE_ORDER``): the decisions of the others do not change.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.data.phash import NONE, EarliestNear, as_words, band_keys, earliest_near, groups_of
from pipeline.io.storage import Location, exists, read_bytes, write_bytes_atomic
from pipeline.spec.prep import NearDupSpec

HASH_FIELDS = [
    pa.field("order", pa.int64()),
    pa.field("shard", pa.string()),
    pa.field("key", pa.string()),
    pa.field("image_hash", pa.binary()),
    pa.field("image_hash_flip", pa.binary()),
]
"""Columns of a near-duplicate index (``image_hash_flip`` is null unless flips count)."""
FOUND_SCHEMA = pa.schema([("shard", pa.string()), ("key", pa.string()), ("duplicate_of", pa.string()),
                          ("duplicate_order", pa.int64())])
_SUCCESS = "_SUCCESS"


def covered_shards(target: Location) -> set[str] | None:
    """The shards the near duplicates in ``target`` were found among, or None if never found."""
    marker = target.child(_SUCCESS)
    return set(json.loads(read_bytes(marker))) if exists(marker) else None


def find_near_duplicates(index: list[Location], shards: list[str], target: Location, spec: NearDupSpec,
                         *, partitions: int, driver_max_rows: int) -> int:
    """Search the hashes of ``index`` (files with ``HASH_FIELDS``) and write every later copy
    under ``target``, then mark it done for ``shards``; returns the records written (each later
    copy once in the driver; on the distributed path once per band it is found in)."""
    fs, path = target.filesystem()
    if fs.exists(path):
        fs.rm(path, recursive=True)
    pafs = target.pyarrow_filesystem()
    paths = [location.filesystem()[1] for location in index]
    rows = sum(pq.read_metadata(p, filesystem=pafs).num_rows for p in paths)
    if driver_max_rows and rows <= driver_max_rows:
        found = _find_in_driver(pa.concat_tables(pq.read_table(p, filesystem=pafs) for p in paths), spec)
        if found.num_rows:
            pq.write_to_dataset(found, path, partition_cols=["shard"], filesystem=pafs)
        count = found.num_rows
    else:
        count = _find_with_shuffle(paths, pafs, path, spec, partitions)
    write_bytes_atomic(target.child(_SUCCESS), json.dumps(sorted(shards)).encode())
    return count


def _hashed(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_valid(table.column("image_hash")))


def _find_in_driver(table: pa.Table, spec: NearDupSpec) -> pa.Table:
    table = _hashed(table)
    order = table.column("order").to_numpy()
    flipped = as_words(table.column("image_hash_flip").to_pylist()) if spec.flips else None
    earliest = earliest_near(order, as_words(table.column("image_hash").to_pylist()), flipped,
                             spec.threshold, spec.band_count)
    later = np.flatnonzero(earliest >= 0)
    keys = table.column("key")
    return pa.table({
        "shard": table.column("shard").take(later),
        "key": keys.take(later),
        "duplicate_of": keys.take(earliest[later]),
        "duplicate_order": pa.array(order[earliest[later]], pa.int64()),
    }, schema=FOUND_SCHEMA)


def band_rows(table: pa.Table, spec: NearDupSpec) -> pa.Table:
    """Every hash (and mirror-image hash) of ``table`` once per LSH band, keyed by the band's bits."""
    table = _hashed(table)
    columns = [table.column("image_hash")] + ([table.column("image_hash_flip")] if spec.flips else [])
    parts = []
    for hashes in columns:
        words = as_words(hashes.to_pylist())
        for band, keys in enumerate(band_keys(words, spec.band_count)):
            parts.append(pa.table({
                "band": pa.array(np.full(table.num_rows, band, np.int32)),
                "band_key": pa.array([row.tobytes() for row in keys], pa.binary()),
                "order": table.column("order"), "shard": table.column("shard"),
                "key": table.column("key"), "hash": hashes,
            }))
    return pa.concat_tables(parts) if parts else pa.table({"band": pa.array([], pa.int32())})


def later_copies_in_block(block: pa.Table, threshold: int) -> pa.Table:
    """The later copies among whole band groups (rows of :func:`band_rows`)."""
    if block.num_rows == 0:
        return FOUND_SCHEMA.empty_table()
    keys = [bytes([band % 256, band // 256]) + key for band, key in
            zip(block.column("band").to_pylist(), block.column("band_key").to_pylist())]
    _, labels = np.unique(np.array(keys, dtype=object), return_inverse=True)
    order = block.column("order").to_numpy()
    search = EarliestNear(order, as_words(block.column("hash").to_pylist()), threshold)
    for members in groups_of(labels.reshape(-1)):
        search.compare(members)
    later = np.flatnonzero(search.best_order != NONE)
    names = block.column("key")
    return pa.table({
        "shard": block.column("shard").take(later), "key": names.take(later),
        "duplicate_of": names.take(search.best_entry[later]),
        "duplicate_order": pa.array(search.best_order[later], pa.int64()),
    }, schema=FOUND_SCHEMA)


def _find_with_shuffle(paths: list[str], pafs, path: str, spec: NearDupSpec, partitions: int) -> int:
    import ray.data

    index = ray.data.read_parquet(paths, filesystem=pafs, partitioning=None)
    bands = index.map_batches(band_rows, fn_kwargs={"spec": spec}, batch_format="pyarrow")
    found = bands.repartition(partitions, keys=["band", "band_key"]).map_batches(
        later_copies_in_block, fn_kwargs={"threshold": spec.threshold}, batch_size=None,
        batch_format="pyarrow").materialize()
    count = found.count()
    if count:
        found.write_parquet(path, filesystem=pafs, partition_cols=["shard"])
    return count


def load_near_duplicates(target: Location, shard: str) -> dict[str, str]:
    """Key -> the key of its earliest earlier near duplicate, for the later copies of ``shard``."""
    partition = target.child(f"shard={shard}")
    fs, path = partition.filesystem()
    if not fs.exists(path):
        return {}
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=["key", "duplicate_of", "duplicate_order"])
    earliest: dict[str, tuple[int, str]] = {}
    for key, of, order in zip(*(table.column(c).to_pylist() for c in ("key", "duplicate_of", "duplicate_order"))):
        if key not in earliest or order < earliest[key][0]:
            earliest[key] = (order, of)
    return {key: of for key, (_, of) in earliest.items()}
