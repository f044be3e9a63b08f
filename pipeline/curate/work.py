"""What each curation phase does to one shard, inside a Ray Data actor (models load once per actor).

``hash`` -> perceptual hashes; ``caption`` -> K synthetic captions per image; ``rank`` -> every
candidate caption's score; ``write`` -> the curated shard, its provenance table and stats. A
phase's output for a shard is written atomically when the shard is done; a sample that cannot be
used (an undecodable image) is recorded, never fatal; anything that stops a whole shard fails
that shard only (see :class:`ShardWork`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.curate.select import Candidates, decide
from pipeline.curate.tasks import CurateTask, read_batches, read_table, write_table
from pipeline.data.dedup import LATE_ORDER
from pipeline.data.drops import Drop
from pipeline.data.neardup import HASH_FIELDS, load_near_duplicates
from pipeline.data.prepared import (
    CAPTION,
    CAPTION_COUNT,
    CAPTION_ORIGINS,
    CAPTION_SCORES,
    CAPTIONS,
    IMAGE,
    KEPT,
    KEY,
    MULTI_TOKEN_COLUMNS,
    SAMPLE_FIELDS,
    SOURCE,
    WEB,
    TOKEN_COLUMNS,
    curated_schema,
    fixed_list,
)
from pipeline.data.provenance import ProvenanceWriter
from pipeline.data.shards import near_duplicates_dir, shard_failure
from pipeline.io.storage import atomic_write, write_bytes_atomic
from pipeline.spec.curate import ActorSpec, CurateSpec

log = logging.getLogger("qformer.curate")

CAPTIONS_SCHEMA = pa.schema([(KEY, pa.string()), ("synthetic", pa.list_(pa.string()))])
SCORES_SCHEMA = pa.schema([(KEY, pa.string()), ("texts", pa.list_(pa.string())),
                           ("origins", pa.list_(pa.string())), ("scores", pa.list_(pa.float32())),
                           ("best", pa.float32())])
"""A ranked image: its distinct candidate captions, their origins and scores (all null when the
image cannot be decoded), and its best score."""


class ShardWork:
    """Base of a phase's Ray Data actor: a batch of shard tasks in, one result row per shard out
    (``{"done": {...}}``, or ``{"failed": ...}`` as ``shard_failure`` describes it)."""

    phase = ""

    def __call__(self, batch: dict) -> dict:
        results = []
        for text in batch["task"]:
            task = CurateTask.from_json(text)
            started = time.monotonic()
            try:
                done = self.process(task)
                results.append({"done": {"name": task.name, "busy_s": round(time.monotonic() - started, 3), **done}})
            except Exception as err:
                failure = shard_failure(task, self.phase, err)
                log.warning("curate: %s: shard %s failed: %s", self.phase, task.name, failure["error"])
                results.append({"failed": failure})
        return {"result": [json.dumps(r) for r in results]}

    def process(self, task: CurateTask) -> dict:
        """Do the phase's work on one shard; returns what to report (``images`` at least)."""
        raise NotImplementedError


def _device(actor: ActorSpec):
    import torch

    torch.set_num_threads(max(1, int(actor.num_cpus)))
    torch.set_grad_enabled(False)
    return torch.device("cuda" if actor.num_gpus > 0 and torch.cuda.is_available() else "cpu")


def _per_image(fn, items: list) -> list:
    """``fn(items)``; if it raises, ``fn`` on each item alone, None for those that raise (an
    undecodable image fails only itself)."""
    try:
        return fn(items)
    except Exception:
        results = []
        for item in items:
            try:
                results.append(fn([item])[0])
            except Exception:
                results.append(None)
        return results


def _near(spec: CurateSpec, task: CurateTask) -> dict[str, str]:
    if not spec.near_duplicates.enabled:
        return {}
    return load_near_duplicates(near_duplicates_dir(task.output_dir), task.name)


class HashWork(ShardWork):
    """Perceptual hashes of a shard's images (``pipeline.data.phash``)."""

    phase = "hash"

    def __init__(self, spec: CurateSpec, late: bool):
        from pipeline.data.phash import ImageHasher

        self.hasher = ImageHasher(spec.near_duplicates)
        self.batch = spec.execution.rows_per_row_group
        self.offset = LATE_ORDER if late else 0

    def process(self, task: CurateTask) -> dict:
        rows: dict[str, list] = {field.name: [] for field in HASH_FIELDS}
        for table in read_batches(task.input, [KEY, IMAGE], self.batch):
            for key, image in zip(table.column(KEY).to_pylist(), table.column(IMAGE).to_pylist()):
                hashes = self.hasher.hash_encoded(image) or (None, None)
                rows["order"].append(self.offset + task.order(len(rows["key"])))
                rows["shard"].append(task.name)
                rows["key"].append(key)
                rows["image_hash"].append(hashes[0])
                rows["image_hash_flip"].append(hashes[1])
        write_table(task.work("hashes"), pa.table(rows, schema=pa.schema(HASH_FIELDS)))
        return {"images": len(rows["key"])}


class CaptionWork(ShardWork):
    """Synthetic captions of a shard's images (near duplicates skipped)."""

    phase = "caption"

    def __init__(self, spec: CurateSpec):
        from pipeline.curate.captioners import build_captioner

        self.spec = spec
        self.captioner = build_captioner(spec.captioner, spec.storage, _device(spec.captioner))

    def process(self, task: CurateTask) -> dict:
        near = _near(self.spec, task)
        keys, synthetic = [], []
        for table in read_batches(task.input, [KEY, IMAGE], self.spec.captioner.batch_size):
            batch = [(k, image) for k, image in zip(table.column(KEY).to_pylist(), table.column(IMAGE).to_pylist())
                     if k not in near]
            if batch:
                keys += [k for k, _ in batch]
                synthetic += _per_image(lambda items: self.captioner([i for _, i in items], [k for k, _ in items]),
                                        batch)
        write_table(task.work("captions"), pa.table({KEY: keys, "synthetic": synthetic}, schema=CAPTIONS_SCHEMA))
        return {"images": len(keys)}


class RankWork(ShardWork):
    """Scores of every candidate caption (the web one and the synthetic ones) of a shard's images."""

    phase = "rank"

    def __init__(self, spec: CurateSpec):
        from pipeline.curate.rankers import build_ranker

        self.spec = spec
        self.ranker = build_ranker(spec.ranker, spec.storage, _device(spec.ranker))

    def process(self, task: CurateTask) -> dict:
        near = _near(self.spec, task)
        synthetic: dict[str, list[str] | None] = {}
        if self.spec.captioner is not None:
            table = read_table(task.work("captions"))
            synthetic = dict(zip(table.column(KEY).to_pylist(), table.column("synthetic").to_pylist()))
        rows: dict[str, list] = {name: [] for name in SCORES_SCHEMA.names}
        for table in read_batches(task.input, [KEY, CAPTION, IMAGE], self.spec.ranker.batch_size):
            batch = [(k, Candidates.of(caption, synthetic.get(k)), image) for k, caption, image in zip(
                *(table.column(c).to_pylist() for c in (KEY, CAPTION, IMAGE))) if k not in near]
            if not batch:
                continue
            scores = _per_image(lambda items: self.ranker([i for _, _, i in items], [list(c.texts) for _, c, _ in items]),
                                batch)
            for (key, candidates, _), score in zip(batch, scores):
                rows[KEY].append(key)
                rows["texts"].append(list(candidates.texts) if score is not None else None)
                rows["origins"].append(list(candidates.origins) if score is not None else None)
                rows["scores"].append(score.tolist() if score is not None else None)
                rows["best"].append(float(score.max()) if score is not None else None)
        write_table(task.work("scores"), pa.table(rows, schema=SCORES_SCHEMA))
        return {"images": len(rows[KEY])}


class WriteWork(ShardWork):
    """The curated shard, its provenance table, then its stats file (the completion marker).

    Args:
        spec: The curate section.
        tokenizers: The input manifest's tokenizers (``{"qformer": {"name", "max_length", ...}, ...}``):
            every kept caption is tokenized as prep tokenized the web captions.
        cut: The corpus's top-fraction score cut, or None.
    """

    phase = "write"

    def __init__(self, spec: CurateSpec, tokenizers: dict, cut: float | None):
        from pipeline.data.tokenize import CaptionTokenizer
        from pipeline.spec.prep import TokenizerSpec

        self.spec, self.tokenizer_info, self.cut = spec, tokenizers, cut
        self.tokenizers = {kind: CaptionTokenizer(TokenizerSpec(name=info["name"], max_length=info["max_length"]),
                                                  append_eos=kind == "llm")
                           for kind, info in tokenizers.items()}
        lengths = {kind: info["max_length"] for kind, info in tokenizers.items()}
        self.schema = curated_schema(lengths["qformer"], lengths.get("llm"))
        self.base_columns = [field.name for field in SAMPLE_FIELDS]

    def process(self, task: CurateTask) -> dict:
        spec = self.spec
        near = _near(spec, task)
        hashes = self._column_by_key(task, "hashes", "image_hash") if spec.near_duplicates.enabled else {}
        ranked = self._ranked(task) if spec.ranker is not None else None
        drops: Counter = Counter()
        samples_in = samples_out = 0
        # The shard is moved into place first, then its provenance table, then the stats file.
        with atomic_write(task.provenance) as provenance_handle, atomic_write(task.output) as handle:
            writer = pq.ParquetWriter(handle, self.schema, compression="zstd")
            provenance = ProvenanceWriter(provenance_handle)
            pending: list[tuple[dict, list[tuple[str, str, float | None]]]] = []
            for table in read_batches(task.input, self.base_columns, spec.execution.rows_per_row_group):
                for row in table.to_pylist():
                    samples_in += 1
                    key = row[KEY]
                    kept, status, record = self._decide(row, near, hashes, ranked)
                    provenance.add(key, row[SOURCE], status, duplicate_of=near.get(key),
                                   image_hash=hashes.get(key), **record)
                    if status != KEPT:
                        drops[status] += 1
                        continue
                    pending.append((row, kept))
                if len(pending) >= spec.execution.rows_per_row_group:
                    samples_out += self._write(writer, pending)
                    pending = []
            if pending:
                samples_out += self._write(writer, pending)
            writer.close()
            provenance.close()
        stats = {"shard": task.name, "input": task.input.url, "output": task.output.url,
                 "provenance": task.provenance.url, "samples_in": samples_in, "samples_out": samples_out,
                 "drops": dict(sorted(drops.items())), "tokenizers": self.tokenizer_info}
        write_bytes_atomic(task.stats, json.dumps(stats, indent=1).encode())
        return {"images": samples_in, "stats": stats}

    @staticmethod
    def _column_by_key(task: CurateTask, phase: str, column: str) -> dict:
        table = read_table(task.work(phase), [KEY, column])
        return dict(zip(table.column(KEY).to_pylist(), table.column(column).to_pylist()))

    @staticmethod
    def _ranked(task: CurateTask) -> dict[str, dict]:
        table = read_table(task.work("scores"))
        return {row[KEY]: row for row in table.to_pylist()}

    def _decide(self, row: dict, near: dict, hashes: dict, ranked: dict | None):
        """(kept captions as (text, origin, score), status, provenance fields) of one input row."""
        key, web = row[KEY], row[CAPTION]
        if key in near:
            return [], Drop.NEAR_DUPLICATE.value, {"captions": _candidates([web], [WEB], [None], [])}
        if self.spec.near_duplicates.enabled and hashes.get(key) is None:
            return [], Drop.IMAGE_CORRUPT.value, {}
        if ranked is None:
            return [(web, WEB, None)], KEPT, {"captions": _candidates([web], [WEB], [None], [0])}
        scored = ranked.get(key)
        if scored is None or scored["scores"] is None:
            return [], Drop.IMAGE_CORRUPT.value, {}
        scores = np.asarray(scored["scores"], np.float32)
        chosen, drop = decide(scores, self.spec.select, self.cut)
        texts, origins = scored["texts"], scored["origins"]
        record = {"best_score": float(scores.max()),
                  "captions": _candidates(texts, origins, scores.tolist(), chosen if drop is None else [])}
        if drop is not None:
            return [], drop.value, record
        return [(texts[i], origins[i], float(scores[i])) for i in chosen], KEPT, record

    def _write(self, writer, pending: list[tuple[dict, list[tuple[str, str, float | None]]]]) -> int:
        rows = [row for row, _ in pending]
        kept = [captions for _, captions in pending]
        columns = {name: [row[name] for row in rows] for name in self.base_columns}
        columns[CAPTION] = [captions[0][0] for captions in kept]
        columns[CAPTIONS] = [[text for text, _, _ in captions] for captions in kept]
        columns[CAPTION_ORIGINS] = [[origin for _, origin, _ in captions] for captions in kept]
        columns[CAPTION_SCORES] = [[score for _, _, score in captions] for captions in kept]
        columns[CAPTION_COUNT] = [len(captions) for captions in kept]
        counts = np.array(columns[CAPTION_COUNT])
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        firsts = offsets.to_numpy()[:-1]
        flat = [text for texts in columns[CAPTIONS] for text in texts]
        for kind, tokenizer in self.tokenizers.items():
            step = self.spec.execution.tokenize_batch_size
            batches = [tokenizer(flat[i : i + step]) for i in range(0, len(flat), step)]
            ids = np.concatenate([b.input_ids for b in batches])  # (M, L)
            mask = np.concatenate([b.attention_mask for b in batches])  # (M, L)
            length = tokenizer.spec.max_length
            for values, single, multi, value_type in (
                (ids, TOKEN_COLUMNS[kind][0], MULTI_TOKEN_COLUMNS[kind][0], pa.int32()),
                (mask, TOKEN_COLUMNS[kind][1], MULTI_TOKEN_COLUMNS[kind][1], pa.int8()),
            ):
                columns[single] = fixed_list(values[firsts], length, value_type)
                columns[multi] = pa.ListArray.from_arrays(offsets, fixed_list(values, length, value_type))
        writer.write_table(pa.table(columns, schema=self.schema))
        return len(rows)


def _candidates(texts, origins, scores, kept: list[int]) -> list[dict]:
    return [{"text": t, "origin": o, "score": s, "kept": i in kept}
            for i, (t, o, s) in enumerate(zip(texts, origins, scores))]
