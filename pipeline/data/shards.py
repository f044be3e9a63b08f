"""The unit of work: one input shard, and the files derived from it in the output folder.

Output layout (``OUT`` is the spec's output folder)::

    OUT/{name}.parquet        training-ready samples of input shard {name}
    OUT/{name}.stats.json     its counts; written last, so it marks the shard complete
    OUT/manifest.json         the whole run
    OUT/_lease.json           the running prep's lease (pipeline.io.lease; _lease.lock beside it
                              on local disk)
    OUT/_work/plan.json       inputs + spec fingerprint (a re-run must match it)
    OUT/_work/index/{name}.parquet   content hashes for corpus-wide dedup
    OUT/_work/duplicates/     (shard, key) of every later copy; _SUCCESS (the shards it covers)
                              when complete
    OUT/_work/near_duplicates/  the same for near-duplicate images (pipeline.data.neardup)
    OUT/provenance/{name}.parquet  every input sample of shard {name}: kept, or why not

A shard that fails (it cannot be read, storage errors outlast their retries) gets no stats file:
it is not complete, the run names it, and the next run tries it again.
"""

from __future__ import annotations

import json
import posixpath
import re
import traceback
from dataclasses import asdict, dataclass

from pipeline.data.prepared import provenance_location
from pipeline.io.redact import redact_text, redact_url
from pipeline.io.storage import Location

STATS_SUFFIX = ".stats.json"
SHARD_SUFFIX = ".parquet"
WORK_DIR = "_work"
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar")


@dataclass(frozen=True)
class ShardTask:
    """An input shard, its position in corpus order, and its output name."""

    name: str
    ordinal: int
    source: Location
    output_dir: Location

    @property
    def output(self) -> Location:
        return self.output_dir.child(self.name + SHARD_SUFFIX)

    @property
    def stats(self) -> Location:
        return self.output_dir.child(self.name + STATS_SUFFIX)

    @property
    def provenance(self) -> Location:
        return provenance_location(self.output_dir, self.name)

    @property
    def index(self) -> Location:
        return self.output_dir.child(WORK_DIR, "index", self.name + SHARD_SUFFIX)

    def to_json(self) -> str:
        """The task as one string column value for a Ray Data dataset."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ShardTask":
        task = json.loads(text)
        return cls(
            name=task["name"],
            ordinal=int(task["ordinal"]),
            source=Location(**task["source"]),
            output_dir=Location(**task["output_dir"]),
        )


def near_duplicates_dir(output_dir: Location) -> Location:
    """Where the near-duplicate images of a prep (or curate) run are recorded."""
    return output_dir.child(WORK_DIR, "near_duplicates")


def plan_tasks(sources: list[Location], output_dir: Location) -> list[ShardTask]:
    """Name each shard after its input file; if two inputs share a name, number them all."""
    stems = [_stem(source.url) for source in sources]
    if len(set(stems)) != len(stems):
        width = max(5, len(str(len(stems))))
        stems = [f"{i:0{width}d}_{stem}" for i, stem in enumerate(stems)]
    return [
        ShardTask(name, ordinal, source, output_dir)
        for ordinal, (name, source) in enumerate(zip(stems, sources))
    ]


def _stem(url: str) -> str:
    base = posixpath.basename(redact_url(url))
    for suffix in TAR_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]", "_", base) or "shard"


def shard_failure(task: ShardTask, phase: str, err: BaseException) -> dict:
    """What the run records of a shard that failed in ``phase`` (``index`` or ``process``):
    a one-line error and the traceback, without credentials. Call it inside ``except``."""
    message = " ".join(redact_text(str(err)).split())
    return {
        "name": task.name,
        "input": redact_url(task.source.url),
        "phase": phase,
        "error": f"{type(err).__name__}: {message}" if message else type(err).__name__,
        "traceback": redact_text(traceback.format_exc()),
    }


def global_order(ordinal: int, order_in_shard: int) -> int:
    """Corpus order of a sample: shard ordinal, then position in the shard."""
    return (ordinal << 32) | order_in_shard
