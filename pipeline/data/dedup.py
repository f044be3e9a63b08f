"""Exact duplicate removal across the whole corpus, on Ray Data, in bounded memory.

1. Index: every shard writes (hash, corpus order, shard, key) for the samples that pass the
   decode-free checks (``screen.py``), and, when near duplicates are removed too, the perceptual
   hashes of their images (``pipeline.data.neardup``) that pass the image header checks.
2. Find later copies: the index rows are hash-partitioned so that all copies of one content
   land in one block; within a block, every row but the earliest of its hash is a duplicate.
   Duplicates are written as Parquet partitioned by shard, then marked complete.
3. Each shard processor reads only its own partition.

The result depends only on the corpus and the spec, so a resumed run drops exactly the same
copies as an uninterrupted one. One exception: a shard that could not be read when the
duplicates were found (a *late* shard) is indexed once it can be, as if it came after every
other shard, and the duplicates are found again. Shards finished meanwhile may already hold the
first copy of something a late shard holds too, and they are not rewritten: so a late shard
keeps only content found nowhere before it or in the other shards, and the output never holds
two copies. The decisions for the other shards do not change.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.data.drops import Drop
from pipeline.data.images import ImageTransform
from pipeline.data.neardup import HASH_FIELDS
from pipeline.data.phash import ImageHasher
from pipeline.data.screen import ShardReadInfo, content_hash, screen_shard
from pipeline.data.shards import WORK_DIR, ShardTask, global_order
from pipeline.io.storage import Location, atomic_write, exists, read_bytes, write_bytes_atomic
from pipeline.spec.prep import PrepSpec

INDEX_SCHEMA = pa.schema([pa.field("hash", pa.string()), *HASH_FIELDS])
_SUCCESS = "_SUCCESS"
LATE_ORDER = 1 << 62
"""Added to the corpus order of a late shard's samples: after every shard's (ordinals < 2**30)."""


def duplicates_dir(output_dir: Location) -> Location:
    return output_dir.child(WORK_DIR, "duplicates")


def index_shard(task: ShardTask, spec: PrepSpec, late: bool) -> int:
    """Write the content-hash (and perceptual-hash) index of one shard; returns the number of
    indexed samples.

    Args:
        late: the duplicates were found before this shard could be read (see the module
            docstring); its samples are ordered after every other shard's.

    Raises:
        Exception: whatever stops the shard from being read; no index is written then.
    """
    filters = spec.filters
    near = filters.near_duplicates
    images = ImageTransform(filters, spec.image)
    hasher = ImageHasher(near) if near.enabled else None
    rows: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
    offset = LATE_ORDER if late else 0
    for sample in screen_shard(task.source, filters, ShardReadInfo()):
        if sample.drop is not None:
            continue
        rows["hash"].append(content_hash(sample.raw.image, sample.caption, filters.dedup))
        rows["order"].append(offset + global_order(task.ordinal, sample.raw.order))
        rows["shard"].append(task.name)
        rows["key"].append(sample.raw.key)
        hashes = _image_hashes(images, hasher, sample.raw.image) if hasher else None
        rows["image_hash"].append(hashes[0] if hashes else None)
        rows["image_hash_flip"].append(hashes[1] if hashes else None)
    with atomic_write(task.index) as handle:
        pq.write_table(pa.table(rows, schema=INDEX_SCHEMA), handle)
    return len(rows["key"])


def _image_hashes(images: ImageTransform, hasher: ImageHasher, data: bytes):
    """The perceptual hashes of an image that passes the header checks (the image filters drop
    the others: they must not make a kept copy a near duplicate), else None."""
    image = images.open(data)
    if isinstance(image, Drop):
        return None
    with image:
        return hasher.hash_opened(image)


def later_copies(block: pa.Table) -> pa.Table:
    """Rows of ``block`` whose hash already occurred earlier in corpus order."""
    if block.num_rows == 0:
        return pa.table({"shard": pa.array([], pa.string()), "key": pa.array([], pa.string())})
    ordered = block.sort_by([("hash", "ascending"), ("order", "ascending")])
    hashes = ordered.column("hash")
    previous = pa.concat_arrays([pa.array([None], pa.string()), hashes.combine_chunks()[:-1]])
    is_copy = pc.fill_null(pc.equal(hashes, previous), False)
    return ordered.filter(is_copy).select(["shard", "key"])


def find_duplicates(
    tasks: list[ShardTask], output_dir: Location, partitions: int, driver_max_rows: int
) -> None:
    """Write every later copy's (shard, key) among ``tasks`` (each with its index written)
    under the duplicates folder, then mark it done, naming the shards it covers.

    Indexes of up to ``driver_max_rows`` rows in all are deduplicated in this process (a few
    hundred MB at most, and no shuffle start-up cost); larger ones by a Ray Data hash shuffle
    whose blocks each hold 1/``partitions`` of the index.
    """
    target = duplicates_dir(output_dir)
    fs, path = target.filesystem()
    if fs.exists(path):
        fs.rm(path, recursive=True)
    index_paths = [task.index.filesystem()[1] for task in tasks]
    if driver_max_rows and _count_rows(index_paths, output_dir) <= driver_max_rows:
        _find_in_driver(index_paths, output_dir, path)
    else:
        _find_with_shuffle(index_paths, output_dir, path, partitions)
    covered = sorted(task.name for task in tasks)
    write_bytes_atomic(target.child(_SUCCESS), json.dumps(covered).encode())


def _count_rows(index_paths: list[str], output_dir: Location) -> int:
    pafs = output_dir.pyarrow_filesystem()
    return sum(pq.read_metadata(path, filesystem=pafs).num_rows for path in index_paths)


def _find_in_driver(index_paths: list[str], output_dir: Location, path: str) -> None:
    pafs = output_dir.pyarrow_filesystem()
    index = pa.concat_tables(pq.read_table(p, filesystem=pafs) for p in index_paths)
    copies = later_copies(index)
    if copies.num_rows:
        pq.write_to_dataset(copies, path, partition_cols=["shard"], filesystem=pafs)


def _find_with_shuffle(index_paths: list[str], output_dir: Location, path: str, partitions: int):
    import ray.data

    pafs = output_dir.pyarrow_filesystem()
    index = ray.data.read_parquet(index_paths, filesystem=pafs, partitioning=None)
    copies = index.repartition(partitions, keys=["hash"]).map_batches(
        later_copies, batch_size=None, batch_format="pyarrow"
    )
    copies.write_parquet(path, filesystem=pafs, partition_cols=["shard"])


def covered_shards(output_dir: Location) -> set[str] | None:
    """The shards the duplicates were found among, or None if they were never found."""
    marker = duplicates_dir(output_dir).child(_SUCCESS)
    return set(json.loads(read_bytes(marker))) if exists(marker) else None


def load_duplicate_keys(output_dir: Location, shard_name: str) -> set[str]:
    """Keys of ``shard_name`` that are later copies of an earlier sample."""
    partition = duplicates_dir(output_dir).child(f"shard={shard_name}")
    fs, path = partition.filesystem()
    if not fs.exists(path):
        return set()
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["key"])
    return set(table.column("key").to_pylist())
