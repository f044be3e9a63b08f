"""The unit of curation work: one prepared input shard, and the files derived from it.

Output layout (``OUT`` is the curate section's output folder)::

    OUT/{name}.parquet               the curated shard (the prepared-shard contract)
    OUT/provenance/{name}.parquet    every input sample: kept, or why not, with scores and captions
    OUT/{name}.stats.json            its counts; written last, so it marks the shard complete
    OUT/manifest.json                the whole run
    OUT/_lease.json                  the running curation's lease
    OUT/_work/plan.json              inputs + spec fingerprint (a re-run must match it)
    OUT/_work/hashes/{name}.parquet    perceptual hashes (near duplicates on)
    OUT/_work/near_duplicates/         the later copies; _SUCCESS names the shards searched
    OUT/_work/captions/{name}.parquet  synthetic captions (captioner on)
    OUT/_work/scores/{name}.parquet    every candidate caption's score (ranker on)
    OUT/_work/score_cut.json           the corpus's top-fraction cut, fixed once computed

Each work file is written atomically once its shard's phase is done, so every phase resumes
where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.prepared import provenance_location
from pipeline.data.shards import SHARD_SUFFIX, STATS_SUFFIX, WORK_DIR, global_order
from pipeline.io.storage import Location


@dataclass(frozen=True)
class CurateTask:
    """A prepared input shard, its position in corpus order, and its output name."""

    name: str
    ordinal: int
    input: Location
    output_dir: Location

    @property
    def output(self) -> Location:
        return self.output_dir.child(self.name + SHARD_SUFFIX)

    @property
    def provenance(self) -> Location:
        return provenance_location(self.output_dir, self.name)

    @property
    def stats(self) -> Location:
        return self.output_dir.child(self.name + STATS_SUFFIX)

    def work(self, phase: str) -> Location:
        """The work file of ``phase`` (``hashes``, ``captions`` or ``scores``)."""
        return self.output_dir.child(WORK_DIR, phase, self.name + SHARD_SUFFIX)

    def order(self, row: int) -> int:
        """Corpus order of the shard's ``row``-th sample."""
        return global_order(self.ordinal, row)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CurateTask":
        task = json.loads(text)
        return cls(task["name"], int(task["ordinal"]), Location(**task["input"]), Location(**task["output_dir"]))


def read_batches(location: Location, columns: list[str], batch_size: int) -> Iterator[pa.Table]:
    """A Parquet file's ``columns`` in tables of at most ``batch_size`` rows, in order."""
    fs, path = location.filesystem()
    with fs.open(path, "rb") as handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=columns):
            yield pa.Table.from_batches([batch])


def read_table(location: Location, columns: list[str] | None = None) -> pa.Table:
    """A whole (small) Parquet file."""
    fs, path = location.filesystem()
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def write_table(location: Location, table: pa.Table) -> None:
    """Write ``table`` atomically (a reader never sees it half-written)."""
    from pipeline.io.storage import atomic_write

    with atomic_write(location) as handle:
        pq.write_table(table, handle, compression="zstd")
