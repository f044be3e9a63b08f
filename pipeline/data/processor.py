"""Process one input shard into one training-ready Parquet shard plus its stats file.

Runs inside a Ray Data actor (tokenizers load once per actor). Samples stream through
read -> screen -> dedup -> near dedup -> image transform -> batched tokenization -> Parquet row
groups, so memory holds one row group, never a whole shard. Every sample, kept or dropped, gets a
row in the shard's provenance table (``pipeline.data.provenance``). A bad sample is a counted drop; anything that
stops a whole shard (it is not a tar, storage errors outlast their retries) fails that shard
only: it gets no stats file, so it is not complete and the next run tries it again.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.dedup import load_duplicate_keys
from pipeline.data.drops import Drop
from pipeline.data.images import ImageTransform, ProcessedImage
from pipeline.data.neardup import load_near_duplicates
from pipeline.data.prepared import KEPT, WEB, fixed_list, output_schema
from pipeline.data.provenance import ProvenanceWriter
from pipeline.data.screen import ScreenedSample, ShardReadInfo, content_hash, screen_shard
from pipeline.data.shards import ShardTask, near_duplicates_dir, shard_failure
from pipeline.data.tokenize import CaptionTokenizer
from pipeline.io.redact import redact_url
from pipeline.io.storage import atomic_write, write_bytes_atomic
from pipeline.spec.prep import PrepSpec

log = logging.getLogger("qformer.prep")


class ShardProcessor:
    """Turns input shards into output shards; one instance per Ray Data actor."""

    def __init__(self, spec: PrepSpec):
        self.spec = spec
        self.images = ImageTransform(spec.filters, spec.image)
        self.qformer = CaptionTokenizer(spec.tokenizers.qformer, append_eos=False)
        llm = spec.tokenizers.llm
        self.llm = CaptionTokenizer(llm, append_eos=True) if llm is not None else None
        self.schema = output_schema(
            spec.tokenizers.qformer.max_length, llm.max_length if llm is not None else None
        )

    def __call__(self, batch: dict) -> dict:
        """Ray Data entry point: a batch of shard tasks in, one result row per shard out:
        ``{"stats": ...}`` for a complete shard, ``{"failed": ...}`` (see ``shard_failure``)."""
        results = []
        for text in batch["task"]:
            task = ShardTask.from_json(text)
            try:
                results.append({"stats": self.process(task)})
            except Exception as err:
                failure = shard_failure(task, "process", err)
                log.warning("prep: shard %s failed: %s", task.name, failure["error"])
                results.append({"failed": failure})
        return {"result": [json.dumps(r) for r in results]}

    def tokenizer_info(self) -> dict:
        info = {"qformer": _tokenizer_info(self.qformer)}
        if self.llm is not None:
            info["llm"] = _tokenizer_info(self.llm)
        return info

    def process(self, task: ShardTask) -> dict:
        """Write ``task``'s output shard and provenance table, then its stats file; returns the
        stats."""
        started = time.monotonic()
        filters = self.spec.filters
        duplicates = load_duplicate_keys(task.output_dir, task.name) if filters.dedup != "none" else set()
        near = _NearDuplicates(task) if filters.near_duplicates.enabled else None
        source = redact_url(task.source.url)
        drops: Counter = Counter()
        info = ShardReadInfo()
        samples_in = samples_out = 0
        # The shard is moved into place first, then its provenance table, then the stats file.
        with atomic_write(task.provenance) as provenance_handle, atomic_write(task.output) as handle:
            writer = pq.ParquetWriter(handle, self.schema, compression="zstd")
            provenance = ProvenanceWriter(provenance_handle)
            pending: list[tuple[ScreenedSample, ProcessedImage]] = []
            for sample in screen_shard(task.source, filters, info):
                samples_in += 1
                outcome = self._image_outcome(sample, duplicates, near)
                self._record(provenance, sample, source, outcome, near)
                if isinstance(outcome, Drop):
                    drops[outcome.value] += 1
                    continue
                pending.append((sample, outcome))
                if len(pending) >= self.spec.execution.rows_per_row_group:
                    samples_out += self._write(writer, task, pending)
                    pending = []
            if pending:
                samples_out += self._write(writer, task, pending)
            writer.close()
            provenance.close()
        stats = {
            "shard": task.name,
            "input": source,
            "output": task.output.url,
            "provenance": task.provenance.url,
            "samples_in": samples_in,
            "samples_out": samples_out,
            "drops": dict(sorted(drops.items())),
            "truncated": info.truncated,
            "unordered": info.unordered,
            "tokenizers": self.tokenizer_info(),
            "wall_time_s": round(time.monotonic() - started, 3),
        }
        # Written after the shard and its provenance are durable (atomic_write fsyncs them): the
        # stats file is the shard's completion marker.
        write_bytes_atomic(task.stats, json.dumps(stats, indent=1).encode())
        return stats

    def _image_outcome(self, sample: ScreenedSample, duplicates: set[str], near: "_NearDuplicates | None"):
        if sample.drop is not None:
            return sample.drop
        if sample.raw.key in duplicates:
            return Drop.DUPLICATE
        if near is not None and sample.raw.key in near.duplicate_of:
            return Drop.NEAR_DUPLICATE
        return self.images.process(sample.raw.image)

    def _record(self, provenance: ProvenanceWriter, sample: ScreenedSample, source: str, outcome,
                near: "_NearDuplicates | None") -> None:
        key, image, caption = sample.raw.key, sample.raw.image, sample.caption
        status = outcome.value if isinstance(outcome, Drop) else KEPT
        provenance.add(
            key, source, status,
            duplicate_of=near.duplicate_of.get(key) if near is not None else None,
            content_hash=content_hash(image, caption or "", _hash_mode(self.spec.filters.dedup)) if image else None,
            image_hash=near.hashes.get(key) if near is not None else None,
            captions=[{"text": caption, "origin": WEB, "score": None, "kept": status == KEPT}]
            if caption is not None else None,
        )

    def _write(self, writer, task: ShardTask, rows: list[tuple[ScreenedSample, ProcessedImage]]):
        captions = [sample.caption for sample, _ in rows]
        columns = {
            "key": [sample.raw.key for sample, _ in rows],
            "source": [redact_url(task.source.url)] * len(rows),
            "caption": captions,
            "image": [image.jpeg for _, image in rows],
            "original_width": [image.original_width for _, image in rows],
            "original_height": [image.original_height for _, image in rows],
            "metadata": [json.dumps(sample.raw.metadata) for sample, _ in rows],
        }
        for prefix, tokenizer in (("qformer", self.qformer), ("llm", self.llm)):
            if tokenizer is None:
                continue
            ids, mask = self._tokenize(tokenizer, captions)
            length = tokenizer.spec.max_length
            columns[f"{prefix}_input_ids"] = fixed_list(ids, length, pa.int32())
            columns[f"{prefix}_attention_mask"] = fixed_list(mask, length, pa.int8())
        writer.write_table(pa.table(columns, schema=self.schema))
        return len(rows)

    def _tokenize(self, tokenizer: CaptionTokenizer, captions: list[str]):
        step = self.spec.execution.tokenize_batch_size
        batches = [tokenizer(captions[i : i + step]) for i in range(0, len(captions), step)]
        ids = np.concatenate([b.input_ids for b in batches])  # (N, L)
        mask = np.concatenate([b.attention_mask for b in batches])  # (N, L)
        return ids, mask


def _tokenizer_info(tokenizer: CaptionTokenizer) -> dict:
    return {
        "name": tokenizer.spec.name,
        "vocab_size": tokenizer.vocab_size,
        "max_length": tokenizer.spec.max_length,
    }


def _hash_mode(dedup: str) -> str:
    return "image" if dedup == "none" else dedup


class _NearDuplicates:
    """A shard's near-duplicate decisions and the perceptual hashes of its images (its index)."""

    def __init__(self, task: ShardTask):
        self.duplicate_of = load_near_duplicates(near_duplicates_dir(task.output_dir), task.name)
        fs, path = task.index.filesystem()
        with fs.open(path, "rb") as handle:
            index = pq.read_table(handle, columns=["key", "image_hash"])
        self.hashes = dict(zip(index.column("key").to_pylist(), index.column("image_hash").to_pylist()))
