"""``qformer prep``: raw WebDataset shards to training-ready Parquet shards, on Ray Data.

Three phases, each resumable on its own: index content (and perceptual) hashes (only when exact
or near-duplicate removal is on), find duplicates across the corpus, then process shards. A shard whose stats file exists is complete
and skipped, so a killed run, run again, ends with exactly the output of an uninterrupted run.
A shard that fails (in either phase) is named and left incomplete; one run at a time writes an
output folder (its lease).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import ray.data
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from pipeline.console import console
from pipeline.data import dedup, neardup
from pipeline.data.drops import merge_counts
from pipeline.data.prepared import MANIFEST
from pipeline.data.processor import ShardProcessor
from pipeline.data.shards import WORK_DIR, ShardTask, near_duplicates_dir, plan_tasks, shard_failure
from pipeline.data.tokenize import CaptionTokenizer
from pipeline.errors import QformerError, UsageError
from pipeline.io.lease import hold_lease
from pipeline.io.redact import redact_url
from pipeline.io.storage import (
    Location,
    exists,
    expand_inputs,
    read_bytes,
    remove_partial_writes,
    storage_errors,
    write_bytes_atomic,
)
from pipeline.ray_runtime import cluster_cpus, ensure_ray
from pipeline.spec.prep import PrepSpec

log = logging.getLogger("qformer.prep")


class PrepError(UsageError, RuntimeError):
    """The job cannot run as asked (inputs missing, output holds a different run)."""


class PrepFailed(QformerError):
    """More shards failed than ``execution.max_failed_shards`` allows (exit status 1); the
    other shards are complete, and the next run retries only the failed ones."""


@dataclass
class PrepPlan:
    spec: PrepSpec
    output_dir: Location
    tasks: list[ShardTask]


def plan_prep(spec: PrepSpec) -> PrepPlan:
    """Expand the inputs, name the shards and check that the tokenizers load; nothing is
    written and no Ray work happens here."""
    try:
        sources = expand_inputs(spec.inputs, spec.storage)
    except FileNotFoundError as err:
        raise PrepError(str(err)) from None
    _check_tokenizers(spec)
    output_dir = Location.of(spec.output, spec.storage)
    return PrepPlan(spec, output_dir, plan_tasks(sources, output_dir))


def _check_tokenizers(spec: PrepSpec) -> None:
    """Load each tokenizer once here, so that a missing package or model is one clear error
    (and a packaged one is converted once, not by every actor at the same time)."""
    from pipeline.assets import AssetError

    for field, tokenizer in (("qformer", spec.tokenizers.qformer), ("llm", spec.tokenizers.llm)):
        if tokenizer is None:
            continue
        try:
            CaptionTokenizer(tokenizer, append_eos=field == "llm")
        except AssetError:
            raise
        except (OSError, ValueError) as err:
            message = " ".join(str(err).split())
            raise PrepError(f"prep.tokenizers.{field}: cannot load {tokenizer.name!r}: {message}") from None


def _claim_output(plan: PrepPlan) -> None:
    """Record what this output folder is for; refuse to mix runs of different specs or inputs.
    Runs under the folder's lease: it deletes what killed runs left half-written."""
    output_dir, spec, tasks = plan.output_dir, plan.spec, plan.tasks
    record = {
        "fingerprint": _fingerprint(spec, tasks),
        "inputs": [redact_url(task.source.url) for task in tasks],
    }
    marker = output_dir.child(WORK_DIR, "plan.json")
    if exists(marker):
        previous = json.loads(read_bytes(marker))
        if previous.get("fingerprint") != record["fingerprint"]:
            raise PrepError(
                f"{output_dir.url} holds the output of a different prep spec or input list; "
                "use another output folder, or delete it to start over"
            )
        removed = remove_partial_writes(output_dir)
        if removed:
            log.info("prep: removed %d half-written files of an earlier run", len(removed))
        return
    write_bytes_atomic(marker, json.dumps(record, indent=1).encode())


def _fingerprint(spec: PrepSpec, tasks: list[ShardTask]) -> str:
    # Execution settings change how the work is spread, never what it produces. Inputs count
    # by address: a presigned URL's signature changes each time it is issued.
    what = spec.model_dump(mode="json", exclude={"execution", "storage", "output", "inputs"})
    what["inputs"] = [redact_url(task.source.url) for task in tasks]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def run_prep(spec: PrepSpec, ray_address: str | None = None) -> dict:
    """Run the whole job and return its manifest (also written to ``OUTPUT/manifest.json``).

    Holds the output folder's lease throughout (``pipeline.io.lease``). Shards that fail are
    named in the manifest's ``failed_shards`` and left incomplete for the next run.

    Raises:
        PrepError: inputs missing, tokenizers not loadable, output of another spec (exit 2).
        LeaseHeld: another run is writing the output folder (exit 2).
        StorageError: storage unreachable or refusing access (exit 2).
        PrepFailed: more than ``execution.max_failed_shards`` shards failed (exit 1), raised
            after the manifest is written.
    """
    started = time.monotonic()
    plan = plan_prep(spec)
    execution = spec.execution
    with storage_errors(plan.output_dir.url), hold_lease(
        plan.output_dir, purpose="qformer prep", stale_after_s=execution.lease_stale_after_s
    ) as lease:
        _claim_output(plan)
        ensure_ray(ray_address)
        workers = execution.workers or cluster_cpus()
        todo = [task for task in plan.tasks if not exists(task.stats)]
        log.info(
            "prep: %d input shards, %d done already, %d to process with %d workers",
            len(plan.tasks), len(plan.tasks) - len(todo), len(todo), workers,
        )
        failed: list[dict] = []
        if todo and (spec.filters.dedup != "none" or spec.filters.near_duplicates.enabled):
            failed = _deduplicate(plan, workers)
            unindexed = {failure["name"] for failure in failed}
            todo = [task for task in todo if task.name not in unindexed]
        lease.check()
        processed, process_failed = _process_shards(plan, todo, workers, started)
        failed += process_failed
        lease.check()
        manifest = _manifest(plan, processed, failed, time.monotonic() - started)
        write_bytes_atomic(plan.output_dir.child(MANIFEST), json.dumps(manifest, indent=1).encode())
    if len(failed) > execution.max_failed_shards:
        raise PrepFailed(
            f"prep: {len(failed)} of {len(plan.tasks)} shards failed ({describe_failures(failed)}); "
            f"the others are complete and the next run retries only these; "
            f"--max-failed-shards N accepts up to N (manifest: {plan.output_dir.url}/manifest.json)"
        )
    return manifest


def describe_failures(failed: list[dict], most: int = 3) -> str:
    """Failed shards (manifest entries) in a few words: the first ``most`` with their errors."""
    named = "; ".join(f"{f['name']}: {f['error']}" for f in failed[:most])
    return named + (f"; and {len(failed) - most} more" if len(failed) > most else "")


def _deduplicate(plan: PrepPlan, workers: int) -> list[dict]:
    """Index every shard not yet indexed and find the exact and near duplicates among the
    indexed shards, if not found among exactly these before; returns the shards that could not
    be indexed."""
    filters, execution = plan.spec.filters, plan.spec.execution
    exact = dedup.covered_shards(plan.output_dir) if filters.dedup != "none" else None
    near_target = near_duplicates_dir(plan.output_dir)
    near = neardup.covered_shards(near_target) if filters.near_duplicates.enabled else None
    failed = _index_corpus(plan, workers, late=exact is not None or near is not None)
    unindexed = {failure["name"] for failure in failed}
    indexed = [task for task in plan.tasks if task.name not in unindexed]
    names = {task.name for task in indexed}
    if filters.dedup != "none" and exact != names:
        log.info("prep: finding duplicates across the corpus")
        dedup.find_duplicates(indexed, plan.output_dir, execution.dedup_partitions, execution.dedup_driver_max_rows)
    if filters.near_duplicates.enabled and near != names:
        log.info("prep: finding near-duplicate images across the corpus")
        found = neardup.find_near_duplicates(
            [task.index for task in indexed], sorted(names), near_target, filters.near_duplicates,
            partitions=execution.dedup_partitions, driver_max_rows=execution.dedup_driver_max_rows)
        log.info("prep: near-duplicate search done (%d records)", found)
    return failed


def _task_dataset(tasks: list[ShardTask]):
    rows = [{"task": task.to_json()} for task in tasks]
    return ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))


def _index_corpus(plan: PrepPlan, workers: int, late: bool) -> list[dict]:
    todo = [task for task in plan.tasks if not exists(task.index)]
    if not todo:
        return []
    log.info("prep: indexing content hashes of %d shards", len(todo))
    spec = plan.spec

    def index_batch(batch: dict) -> dict:
        results = []
        for text in batch["task"]:
            task = ShardTask.from_json(text)
            try:
                dedup.index_shard(task, spec, late)
                results.append("")
            except Exception as err:
                results.append(json.dumps(shard_failure(task, "index", err)))
        return {"failed": results}

    rows = _task_dataset(todo).map_batches(
        index_batch, batch_size=1, compute=TaskPoolStrategy(size=workers)
    ).take_all()
    failed = [json.loads(row["failed"]) for row in rows if row["failed"]]
    for failure in failed:
        log.warning("prep: shard %s cannot be indexed: %s", failure["name"], failure["error"])
    return sorted(failed, key=lambda failure: failure["name"])


def _process_shards(
    plan: PrepPlan, todo: list[ShardTask], workers: int, started: float
) -> tuple[list[dict], list[dict]]:
    """Process ``todo``; returns the stats of the shards completed and the failures."""
    if not todo:
        return [], []
    results = _task_dataset(todo).map_batches(
        ShardProcessor,
        fn_constructor_kwargs={"spec": plan.spec},
        batch_size=1,
        compute=ActorPoolStrategy(size=min(workers, len(todo))),
        num_cpus=1,
    )
    processed: list[dict] = []
    failed: list[dict] = []
    progress = console().progress("prep: shards", len(todo))
    progress.update(0)
    for row in results.iter_rows():
        result = json.loads(row["result"])
        if "failed" in result:
            failed.append(result["failed"])
            progress.write(f"prep: shard {result['failed']['name']} failed: {result['failed']['error']}")
        else:
            processed.append(result["stats"])
        progress.update(len(processed) + len(failed), _progress_detail(processed, failed, started))
    progress.close()
    return processed, sorted(failed, key=lambda failure: failure["name"])


def _progress_detail(processed: list[dict], failed: list[dict], started: float) -> str:
    samples = sum(s["samples_in"] for s in processed)
    kept = sum(s["samples_out"] for s in processed)
    drops = merge_counts(*(s["drops"] for s in processed))
    rate = samples / max(time.monotonic() - started, 1e-9)
    top = ", ".join(f"{k} {v}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1])[:4])
    return (f"{len(failed)} failed | " if failed else "") + (
        f"samples in {samples}, out {kept} | {rate:.1f} samples/s | dropped {sum(drops.values())}"
        + (f" ({top})" if top else ""))


def _manifest(plan: PrepPlan, processed: list[dict], failed: list[dict], wall_time: float) -> dict:
    unfinished = {failure["name"] for failure in failed}
    stats = [json.loads(read_bytes(task.stats)) for task in plan.tasks if task.name not in unfinished]
    samples_in = sum(s["samples_in"] for s in stats)
    samples_out = sum(s["samples_out"] for s in stats)
    processed_in = sum(s["samples_in"] for s in processed)
    spec = plan.spec.model_dump(mode="json")
    spec["inputs"] = [redact_url(pattern) for pattern in spec["inputs"]]
    return {
        "spec": spec,
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
        ],
        "failed_shards": failed,
        "truncated_shards": [s["shard"] for s in stats if s["truncated"]],
        "run": {
            "wall_time_s": round(wall_time, 3),
            "shards_processed": len(processed),
            "shards_failed": len(failed),
            "shards_skipped": len(stats) - len(processed),
            "samples_processed": processed_in,
            "samples_per_s": round(processed_in / wall_time, 2) if wall_time > 0 else None,
        },
    }
