"""``qformer prep``: raw WebDataset shards to training-ready Parquet shards, on Ray Data.

Three phases, each resumable on its own: index content hashes (only when dedup is on), find
duplicates across the corpus, then process shards. A shard whose stats file exists is complete
and skipped, so a killed run, run again, ends with exactly the output of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import ray.data
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from pipeline.errors import UsageError
from pipeline.data import dedup
from pipeline.data.drops import merge_counts
from pipeline.data.prepared import MANIFEST
from pipeline.data.processor import ShardProcessor
from pipeline.data.shards import WORK_DIR, ShardTask, plan_tasks
from pipeline.io.storage import Location, exists, expand_inputs, read_bytes, write_bytes_atomic
from pipeline.ray_runtime import cluster_cpus, ensure_ray
from pipeline.spec.prep import PrepSpec

log = logging.getLogger("qformer.prep")


class PrepError(UsageError, RuntimeError):
    """The job cannot run as asked (inputs missing, output holds a different run)."""


@dataclass
class PrepPlan:
    spec: PrepSpec
    output_dir: Location
    tasks: list[ShardTask]


def plan_prep(spec: PrepSpec) -> PrepPlan:
    """Expand the inputs and check the output folder; no Ray work happens here."""
    try:
        sources = expand_inputs(spec.inputs, spec.storage)
    except FileNotFoundError as err:
        raise PrepError(str(err)) from None
    output_dir = Location.of(spec.output, spec.storage)
    tasks = plan_tasks(sources, output_dir)
    _claim_output(output_dir, spec, tasks)
    return PrepPlan(spec, output_dir, tasks)


def _claim_output(output_dir: Location, spec: PrepSpec, tasks: list[ShardTask]) -> None:
    """Record what this output folder is for; refuse to mix runs of different specs or inputs."""
    plan = {
        "fingerprint": _fingerprint(spec, tasks),
        "inputs": [task.source.url for task in tasks],
    }
    marker = output_dir.child(WORK_DIR, "plan.json")
    if exists(marker):
        previous = json.loads(read_bytes(marker))
        if previous.get("fingerprint") != plan["fingerprint"]:
            raise PrepError(
                f"{output_dir.url} holds the output of a different prep spec or input list; "
                "use another output folder, or delete it to start over"
            )
        _remove_partial_files(output_dir)
        return
    write_bytes_atomic(marker, json.dumps(plan, indent=1).encode())


def _remove_partial_files(output_dir: Location) -> None:
    """Delete what a killed run left half-written (never read, but it takes space)."""
    fs, path = output_dir.filesystem()
    for pattern in ("*.tmp-*", f"{WORK_DIR}/index/*.tmp-*"):
        for leftover in fs.glob(f"{path}/{pattern}"):
            fs.rm(leftover)


def _fingerprint(spec: PrepSpec, tasks: list[ShardTask]) -> str:
    # Execution settings change how the work is spread, never what it produces.
    what = spec.model_dump(mode="json", exclude={"execution", "storage", "output"})
    what["inputs"] = [task.source.url for task in tasks]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def run_prep(spec: PrepSpec, ray_address: str | None = None) -> dict:
    """Run the whole job and return its manifest (also written to ``OUTPUT/manifest.json``)."""
    started = time.monotonic()
    plan = plan_prep(spec)
    ensure_ray(ray_address)
    workers = spec.execution.workers or cluster_cpus()
    todo = [task for task in plan.tasks if not exists(task.stats)]
    log.info(
        "prep: %d input shards, %d done already, %d to process with %d workers",
        len(plan.tasks), len(plan.tasks) - len(todo), len(todo), workers,
    )
    if todo and spec.filters.dedup != "none" and not dedup.duplicates_ready(plan.output_dir):
        _index_corpus(plan, workers)
        log.info("prep: finding duplicates across the corpus")
        dedup.find_duplicates(
            plan.tasks,
            plan.output_dir,
            spec.execution.dedup_partitions,
            spec.execution.dedup_driver_max_rows,
        )
    processed = _process_shards(plan, todo, workers, started)
    manifest = _manifest(plan, processed, time.monotonic() - started)
    write_bytes_atomic(plan.output_dir.child(MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def _task_dataset(tasks: list[ShardTask]):
    rows = [{"task": task.to_json()} for task in tasks]
    return ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))


def _index_corpus(plan: PrepPlan, workers: int) -> None:
    todo = [task for task in plan.tasks if not exists(task.index)]
    if not todo:
        return
    log.info("prep: indexing content hashes of %d shards", len(todo))
    filters = plan.spec.filters

    def index_batch(batch: dict) -> dict:
        counts = [dedup.index_shard(ShardTask.from_json(t), filters) for t in batch["task"]]
        return {"indexed": counts}

    _task_dataset(todo).map_batches(
        index_batch, batch_size=1, compute=TaskPoolStrategy(size=workers)
    ).materialize()


def _process_shards(plan: PrepPlan, todo: list[ShardTask], workers: int, started: float) -> list[dict]:
    if not todo:
        return []
    results = _task_dataset(todo).map_batches(
        ShardProcessor,
        fn_constructor_kwargs={"spec": plan.spec},
        batch_size=1,
        compute=ActorPoolStrategy(size=min(workers, len(todo))),
        num_cpus=1,
    )
    processed: list[dict] = []
    for row in results.iter_rows():
        stats = json.loads(row["stats"])
        processed.append(stats)
        _log_progress(processed, len(todo), started)
    return processed


def _log_progress(processed: list[dict], total: int, started: float) -> None:
    samples = sum(s["samples_in"] for s in processed)
    kept = sum(s["samples_out"] for s in processed)
    drops = merge_counts(*(s["drops"] for s in processed))
    rate = samples / max(time.monotonic() - started, 1e-9)
    top = ", ".join(f"{k} {v}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1])[:4])
    log.info(
        "prep: shards %d/%d | samples in %d, out %d | %.1f samples/s | dropped %d%s",
        len(processed), total, samples, kept, rate, sum(drops.values()),
        f" ({top})" if top else "",
    )


def _manifest(plan: PrepPlan, processed: list[dict], wall_time: float) -> dict:
    stats = [json.loads(read_bytes(task.stats)) for task in plan.tasks]
    samples_in = sum(s["samples_in"] for s in stats)
    samples_out = sum(s["samples_out"] for s in stats)
    processed_in = sum(s["samples_in"] for s in processed)
    return {
        "spec": plan.spec.model_dump(mode="json"),
        "tokenizers": next((s["tokenizers"] for s in stats if s.get("tokenizers")), {}),
        "totals": {
            "shards": len(stats),
            "samples_in": samples_in,
            "samples_out": samples_out,
            "dropped": samples_in - samples_out,
        },
        "drops": merge_counts(*(s["drops"] for s in stats)),
        "shards": [
            {"name": s["shard"], "input": s["input"], "output": s["output"], "samples": s["samples_out"]}
            for s in stats
            if s["error"] is None
        ],
        "failed_shards": [
            {"name": s["shard"], "input": s["input"], "error": s["error"]} for s in stats if s["error"]
        ],
        "truncated_shards": [s["shard"] for s in stats if s["truncated"]],
        "run": {
            "wall_time_s": round(wall_time, 3),
            "shards_processed": len(processed),
            "shards_skipped": len(stats) - len(processed),
            "samples_processed": processed_in,
            "samples_per_s": round(processed_in / wall_time, 2) if wall_time > 0 else None,
        },
    }
