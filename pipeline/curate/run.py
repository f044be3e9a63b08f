"""``qformer curate``: prepared shards in, curated prepared shards out, on Ray Data.

Phases, each resumable per shard (a shard's work file is written when its phase is done):

1. ``hash`` (near duplicates on): perceptual hashes of every image;
2. the near-duplicate search over the whole corpus (``pipeline.data.neardup``);
3. ``caption`` (a captioner set): K synthetic captions per image not a near duplicate;
4. ``rank`` (a ranker set): every candidate caption scored;
5. the top-fraction cut over the whole corpus (``select.top_fraction``), fixed once computed;
6. ``write``: each curated shard, its provenance table, then its stats file, which marks the
   shard complete. Running the same command again skips complete shards, so a killed run, run
   again, ends with exactly the output of an uninterrupted one.

Models run in Ray Data actor pools (each actor loads its model once; GPUs when the spec gives
actors ``num_gpus``). A shard that fails in any phase is named in the manifest and left
incomplete for the next run; the other shards go on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import numpy as np

from pipeline.curate.select import top_fraction_cut
from pipeline.curate.tasks import CurateTask, read_table
from pipeline.curate.work import CaptionWork, HashWork, RankWork, ShardWork, WriteWork
from pipeline.data import neardup
from pipeline.data.drops import merge_counts
from pipeline.data.prepared import MANIFEST
from pipeline.data.shards import WORK_DIR, near_duplicates_dir
from pipeline.errors import QformerError, UsageError
from pipeline.io.lease import hold_lease
from pipeline.io.storage import (
    Location,
    exists,
    read_bytes,
    remove_partial_writes,
    storage_errors,
    write_bytes_atomic,
)
from pipeline.spec.curate import ActorSpec, CurateSpec

log = logging.getLogger("qformer.curate")
_RESOURCES = {"actors", "num_cpus", "num_gpus"}


class CurateError(UsageError, RuntimeError):
    """The curation cannot run as asked (no input, models that do not load, another spec's output)."""


class CurateFailed(QformerError):
    """More shards failed than ``execution.max_failed_shards`` allows (exit status 1)."""


@dataclass
class CuratePlan:
    spec: CurateSpec
    input_manifest: Location
    tokenizers: dict
    output_dir: Location
    tasks: list[CurateTask]


def plan_curate(spec: CurateSpec) -> CuratePlan:
    """Read the input manifest, name the shards and check that the models can be found; nothing
    is written and no Ray work happens here.

    Raises:
        CurateError: no input or output, an input that is not a prep output, unusable models.
    """
    for field in ("input", "output"):
        if getattr(spec, field) is None:
            raise CurateError(f"curate.{field}: required (a prep output folder to curate, and where to write)")
    manifest_location = Location.of(spec.input, spec.storage).child(MANIFEST)
    if not exists(manifest_location):
        raise CurateError(f"curate.input: {manifest_location.url} not found; curate reads a `qformer prep` output")
    manifest = json.loads(read_bytes(manifest_location))
    tokenizers = {kind: {"name": info["name"], "max_length": info["max_length"]}
                  for kind, info in manifest.get("tokenizers", {}).items()}
    if "qformer" not in tokenizers or not manifest.get("shards"):
        raise CurateError(f"curate.input: {manifest_location.url} lists no shard or no Q-Former tokenizer")
    output_dir = Location.of(spec.output, spec.storage)
    tasks = [CurateTask(entry["name"], ordinal, Location(entry["output"], manifest_location.options), output_dir)
             for ordinal, entry in enumerate(manifest["shards"])]
    spec = _absolute_models(spec)
    _check_models(spec)
    return CuratePlan(spec, manifest_location, tokenizers, output_dir, tasks)


def _absolute_models(spec: CurateSpec) -> CurateSpec:
    """Local model folders as absolute paths: the actors may run in another working directory."""
    import os

    update = {}
    for field in ("captioner", "ranker"):
        model = getattr(spec, field)
        if model is not None and os.path.isdir(model.model):
            update[field] = model.model_copy(update={"model": os.path.abspath(model.model)})
    return spec.model_copy(update=update)


def _check_models(spec: CurateSpec) -> None:
    """Find each model's checkpoint or config now, so that a wrong path is one clear error."""
    from transformers import AutoConfig

    from pipeline.curate.sources import our_checkpoint, transformers_name

    for field, model, objectives in (("captioner", spec.captioner, (1, 2)), ("ranker", spec.ranker, (1,))):
        if model is None:
            continue
        if our_checkpoint(model.model, model.kind, model.stage, spec.storage, objectives, field) is None:
            try:
                AutoConfig.from_pretrained(transformers_name(model.model))
            except (OSError, ValueError) as err:
                raise CurateError(f"curate.{field}.model: cannot load {model.model!r}: "
                                  f"{' '.join(str(err).split())[:300]}") from None


def _fingerprint(plan: CuratePlan) -> str:
    # Resources change how the work is spread, never what it produces.
    spec = plan.spec
    what = spec.model_dump(mode="json", exclude={"execution", "storage", "output", "input"})
    for field in ("captioner", "ranker"):
        if what.get(field):
            what[field] = {k: v for k, v in what[field].items() if k not in _RESOURCES}
    what["inputs"] = [task.input.url for task in plan.tasks]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _claim_output(plan: CuratePlan) -> None:
    marker = plan.output_dir.child(WORK_DIR, "plan.json")
    fingerprint = _fingerprint(plan)
    if exists(marker):
        if json.loads(read_bytes(marker)).get("fingerprint") != fingerprint:
            raise CurateError(f"{plan.output_dir.url} holds the output of a different curate spec or input; "
                              "use another output folder, or delete it to start over")
        removed = remove_partial_writes(plan.output_dir)
        if removed:
            log.info("curate: removed %d half-written files of an earlier run", len(removed))
        return
    write_bytes_atomic(marker, json.dumps({"fingerprint": fingerprint,
                                           "inputs": [t.input.url for t in plan.tasks]}, indent=1).encode())


def run_curate(spec: CurateSpec, ray_address: str | None = None) -> dict:
    """Run the whole curation and return its manifest (also ``OUTPUT/manifest.json``).

    Raises:
        CurateError: bad input, unusable models, an output folder of another spec (exit 2).
        LeaseHeld: another run is writing the output folder (exit 2).
        CurateFailed: more than ``execution.max_failed_shards`` shards failed (exit 1), after the
            manifest is written.
    """
    from pipeline.ray_runtime import ensure_ray

    started = time.monotonic()
    plan = plan_curate(spec)
    with storage_errors(plan.output_dir.url), hold_lease(
        plan.output_dir, purpose="qformer curate", stale_after_s=spec.execution.lease_stale_after_s
    ) as lease:
        _claim_output(plan)
        ensure_ray(ray_address)
        todo = [task for task in plan.tasks if not exists(task.stats)]
        log.info("curate: %d input shards, %d done already, %d to curate",
                 len(plan.tasks), len(plan.tasks) - len(todo), len(todo))
        run = _Run(plan)
        if todo:
            todo = run.near_duplicates(todo)
            if spec.captioner is not None:
                todo = run.phase(CaptionWork, todo, "captions", spec.captioner, spec=spec)
            if spec.ranker is not None:
                todo = run.phase(RankWork, todo, "scores", spec.ranker, spec=spec)
            cut = run.score_cut() if spec.select.top_fraction is not None else None
            lease.check()
            run.phase(WriteWork, todo, None, None, spec=spec, tokenizers=plan.tokenizers, cut=cut)
        lease.check()
        manifest = _manifest(plan, run, time.monotonic() - started)
        write_bytes_atomic(plan.output_dir.child(MANIFEST), json.dumps(manifest, indent=1).encode())
    if len(run.failed) > spec.execution.max_failed_shards:
        named = "; ".join(f"{f['name']} ({f['phase']}): {f['error']}" for f in run.failed[:3])
        raise CurateFailed(f"curate: {len(run.failed)} of {len(plan.tasks)} shards failed ({named}); the others "
                           f"are complete and the next run retries only these (manifest: "
                           f"{plan.output_dir.url}/{MANIFEST})")
    return manifest


class _Run:
    """One run's phases: which shards are still going, which failed, how fast each phase went."""

    def __init__(self, plan: CuratePlan):
        self.plan = plan
        self.failed: list[dict] = []
        self.phases: dict[str, dict] = {}
        self.near_found: int | None = None
        self.cut: float | None = None

    def near_duplicates(self, todo: list[CurateTask]) -> list[CurateTask]:
        """Hash the shards not hashed yet and search the corpus, unless searched among exactly
        these shards before; returns the shards of ``todo`` still going."""
        spec = self.plan.spec
        if not spec.near_duplicates.enabled:
            return todo
        target = near_duplicates_dir(self.plan.output_dir)
        # Hashed after a search: ordered after every shard searched, whose decisions stand.
        late = neardup.covered_shards(target) is not None
        self.phase(HashWork, self.plan.tasks, "hashes", None, spec=spec, late=late)
        hashed = [task for task in self.plan.tasks if exists(task.work("hashes"))]
        names = sorted(task.name for task in hashed)
        if neardup.covered_shards(target) != set(names):
            log.info("curate: finding near-duplicate images among %d shards", len(hashed))
            execution = spec.execution
            self.near_found = neardup.find_near_duplicates(
                [task.work("hashes") for task in hashed], names, target, spec.near_duplicates,
                partitions=execution.near_duplicate_partitions, driver_max_rows=execution.driver_max_rows)
            log.info("curate: near-duplicate search done (%d records)", self.near_found)
        return [task for task in todo if task.name in set(names)]

    def phase(self, work: type[ShardWork], tasks: list[CurateTask], output: str | None,
              actor: ActorSpec | None, **kwargs) -> list[CurateTask]:
        """Run ``work`` over the ``tasks`` whose ``output`` work file is missing (all when None);
        returns the tasks that have it now (that did not fail)."""
        pending = [task for task in tasks if output is None or not exists(task.work(output))]
        failed = _run_phase(self, work, pending, actor, kwargs)
        return [task for task in tasks if task.name not in failed]

    def score_cut(self) -> float | None:
        """The top-fraction cut: read if computed before, else computed over every scored shard."""
        spec, location = self.plan.spec, self.plan.output_dir.child(WORK_DIR, "score_cut.json")
        if exists(location):
            record = json.loads(read_bytes(location))
        else:
            scored = [task for task in self.plan.tasks if exists(task.work("scores"))]
            best = np.concatenate([read_table(task.work("scores"), ["best"]).column("best").drop_null().to_numpy()
                                   for task in scored]) if scored else np.zeros(0, np.float32)
            record = {"top_fraction": spec.select.top_fraction, "samples": int(best.size),
                      "shards": sorted(task.name for task in scored),
                      "cut": top_fraction_cut(best, spec.select.top_fraction) if best.size else None}
            write_bytes_atomic(location, json.dumps(record, indent=1).encode())
            log.info("curate: top %.0f%% of %d scored samples: best score >= %s",
                     100 * spec.select.top_fraction, best.size, record["cut"])
        self.cut = record["cut"]
        return self.cut


def _actors(actor: ActorSpec | None, workers: int | None, count: int) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) of a phase over ``count`` shards: a model's actor
    spec, or for the CPU phases (``actor`` None) ``workers`` actors (None: one per CPU)."""
    import ray

    from pipeline.ray_runtime import cluster_cpus

    if actor is None:
        return max(1, min(workers or cluster_cpus(), count)), 1.0, 0.0
    if actor.actors is not None:
        size = actor.actors
    elif actor.num_gpus > 0:
        size = int(ray.cluster_resources().get("GPU", 0) // actor.num_gpus)
    else:
        size = int(cluster_cpus() // actor.num_cpus)
    return max(1, min(size, count)), actor.num_cpus, actor.num_gpus


def _run_phase(run: _Run, work: type[ShardWork], tasks: list[CurateTask], actor: ActorSpec | None,
               kwargs: dict) -> set[str]:
    """Run one phase's actor pool over ``tasks``; records its throughput and failures, returns
    the names of the shards that failed."""
    import ray.data
    from ray.data import ActorPoolStrategy

    if not tasks:
        return set()
    actors, cpus, gpus = _actors(actor, run.plan.spec.execution.workers, len(tasks))
    log.info("curate: %s: %d shards with %d actor(s) (%g CPU, %g GPU each)", work.phase, len(tasks), actors, cpus, gpus)
    dataset = ray.data.from_items([{"task": task.to_json()} for task in tasks], override_num_blocks=len(tasks))
    results = dataset.map_batches(work, fn_constructor_kwargs=kwargs, batch_size=1,
                                  compute=ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=gpus)
    started = time.monotonic()
    images = busy = 0.0
    done, failed = 0, set()
    for row in results.iter_rows():
        result = json.loads(row["result"])
        if "failed" in result:
            run.failed.append(result["failed"])
            failed.add(result["failed"]["name"])
        else:
            done += 1
            images += result["done"]["images"]
            busy += result["done"]["busy_s"]
        elapsed = time.monotonic() - started
        log.info("curate: %s: shards %d/%d%s | %d images | %.1f images/s", work.phase, done + len(failed),
                 len(tasks), f" ({len(failed)} failed)" if failed else "", images, images / max(elapsed, 1e-9))
    wall = time.monotonic() - started
    run.phases[work.phase] = {
        "shards": done, "images": int(images), "actors": actors, "cpus_per_actor": cpus, "gpus_per_actor": gpus,
        "wall_time_s": round(wall, 2), "images_per_s": round(images / wall, 3) if wall else None,
        # Busy time: inside the actors, model loading excluded; per CPU core reserved.
        "images_per_s_per_cpu": round(images / (busy * cpus), 3) if busy else None,
    }
    return failed


def _manifest(plan: CuratePlan, run: _Run, wall_time: float) -> dict:
    unfinished = {failure["name"] for failure in run.failed}
    stats = [json.loads(read_bytes(task.stats)) for task in plan.tasks
             if task.name not in unfinished and exists(task.stats)]
    samples_in = sum(s["samples_in"] for s in stats)
    samples_out = sum(s["samples_out"] for s in stats)
    cut_file = plan.output_dir.child(WORK_DIR, "score_cut.json")
    previous = plan.output_dir.child(MANIFEST)
    # Each phase's figures from the run that last did its work (a rerun may have none to do).
    phases = {**(json.loads(read_bytes(previous)).get("phases", {}) if exists(previous) else {}), **run.phases}
    return {
        "spec": plan.spec.model_dump(mode="json"),
        "input": plan.input_manifest.url,
        "tokenizers": plan.tokenizers,
        "totals": {"shards": len(stats), "samples_in": samples_in, "samples_out": samples_out,
                   "dropped": samples_in - samples_out},
        "drops": merge_counts(*(s["drops"] for s in stats)),
        "shards": [{"name": s["shard"], "input": s["input"], "output": s["output"], "provenance": s["provenance"],
                    "samples": s["samples_out"]} for s in stats],
        "failed_shards": sorted(run.failed, key=lambda f: f["name"]),
        "score_cut": json.loads(read_bytes(cut_file)) if exists(cut_file) else None,
        "phases": phases,
        "run": {"wall_time_s": round(wall_time, 3), "shards_failed": len(run.failed)},
    }

