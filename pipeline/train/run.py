"""``qformer train``: run a staged curriculum on Ray Train + DeepSpeed, resuming where it stopped.

Each stage is one Ray Train run named after the stage, inside the run folder
``{run.storage}/{run.name}/``. A finished stage leaves ``{stage}/complete.json``; running the
same job again skips finished stages and resumes the unfinished one from its latest complete
checkpoint. Worker failures inside a stage are restarted by Ray Train (``FailureConfig``).
"""

from __future__ import annotations

import json
import logging
import os
import time

from pipeline.checkpoint.format import COMPLETE, METADATA, METRICS, SUMMARY
from pipeline.data.prepared import MANIFEST, shards_from_manifest
from pipeline.errors import QformerError
from pipeline.eval.periodic import resolve_stage_evals
from pipeline.io.storage import Location, exists, read_bytes, write_bytes_atomic
from pipeline.ray_runtime import ensure_ray
from pipeline.spec import JobSpec
from pipeline.spec.train import StageSpec
from pipeline.train.task import StageTask
from pipeline.train.worker import train_stage

log = logging.getLogger("qformer.train")


class TrainError(QformerError, RuntimeError):
    """The job cannot run as asked (no data, incompatible tokens, a stage failed)."""


def run_dir_of(job: JobSpec) -> Location:
    return Location.of(job.run.storage, job.run.storage_options).child(job.run.name)


def run_training(job: JobSpec) -> dict:
    """Run every unfinished stage in order; returns a summary (also ``summary.json``)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    job, vision_note = resolve_model_paths(job)
    ensure_ray(job.run.ray_address)
    run_dir = run_dir_of(job)
    shards = _training_shards(job, run_dir)
    job = _resolve_evals(job)
    summary = {"run": run_dir.url, "vision_tower": vision_note, "stages": []}
    previous: Location | None = None
    for index, stage in enumerate(job.stages):
        marker = run_dir.child(stage.name, COMPLETE)
        if exists(marker):
            done = json.loads(read_bytes(marker))
            log.info("train: stage %s finished earlier (step %d); skipping", stage.name, done["step"])
        else:
            init = _init_weights(job, stage, run_dir, previous)
            done = _run_stage(job, index, run_dir, shards, init)
            write_bytes_atomic(marker, json.dumps(done, indent=1).encode())
        previous = Location(done["checkpoint"], run_dir.options)
        summary["stages"].append(done)
    write_bytes_atomic(run_dir.child(SUMMARY), json.dumps(summary, indent=1).encode())
    return summary


def resolve_model_paths(job: JobSpec) -> tuple[JobSpec, str]:
    """Make local model folders absolute (workers may run elsewhere) and apply the vision
    tower's fallback when its ``name`` cannot be reached; returns the job and a note saying
    which tower is used."""
    model = job.model
    vision = model.vision
    note = vision.name
    if vision.fallback and not _loadable(vision.name):
        log.warning(
            "WARNING: vision tower %r is not reachable (no such folder, no hub access); using the "
            "fallback %r, a randomly initialised tower: this run does NOT use pretrained vision "
            "features", vision.name, vision.fallback,
        )
        vision = vision.model_copy(update={"name": vision.fallback})
        note = f"{vision.fallback} (FALLBACK, randomly initialised: {model.vision.name} was not reachable)"
    model = model.model_copy(update={
        "vision": vision.model_copy(update={"name": _absolute(vision.name)}),
        "qformer": model.qformer.model_copy(update={"bert": _absolute(model.qformer.bert)}),
        "llm": model.llm.model_copy(update={"name": _absolute(model.llm.name)}),
    })
    return job.model_copy(update={"model": model}), note


def _absolute(name: str) -> str:
    return os.path.abspath(name) if os.path.isdir(name) else name


def _loadable(name: str) -> bool:
    from transformers import AutoConfig

    from pipeline.assets import resolve_model

    try:
        AutoConfig.from_pretrained(resolve_model(name))
    except (OSError, ValueError):
        return False
    return True


def _training_shards(job: JobSpec, run_dir: Location) -> tuple[Location, ...]:
    if job.data.raw is not None:
        from pipeline.data.prep import run_prep

        prepared = run_dir.child("prepared")
        raw = job.data.raw.model_copy(update={"output": prepared.url})
        log.info("train: preparing raw shards into %s", prepared.url)
        run_prep(raw, ray_address=job.run.ray_address)
    else:
        prepared = Location.of(job.data.prepared, job.data.storage)
    if job.data.curate is not None:
        from pipeline.curate.run import run_curate

        curated = run_dir.child("curated")
        log.info("train: curating %s into %s", prepared.url, curated.url)
        run_curate(job.data.curate.model_copy(update={"input": prepared.url, "output": curated.url}),
                   ray_address=job.run.ray_address)
        prepared = curated
    manifest = prepared.child(MANIFEST)
    if not exists(manifest):
        raise TrainError(f"data: {manifest.url} not found; run `qformer prep` on the corpus first")
    _check_tokens(job, json.loads(read_bytes(manifest)))
    return shards_from_manifest(manifest)


def _resolve_evals(job: JobSpec) -> JobSpec:
    try:
        return resolve_stage_evals(job)
    except ValueError as err:
        raise TrainError(str(err)) from None


def _check_tokens(job: JobSpec, manifest: dict) -> None:
    tokenizers = manifest.get("tokenizers", {})
    qformer = tokenizers.get("qformer", {})
    if qformer and qformer.get("max_length") != job.model.qformer.max_text_length:
        raise TrainError(
            f"model.qformer.max_text_length is {job.model.qformer.max_text_length} but the "
            f"prepared data has Q-Former tokens of length {qformer.get('max_length')}"
        )
    if any(stage.objective == 2 for stage in job.stages) and "llm" not in tokenizers:
        raise TrainError("a stage trains with the LLM (lm loss) but the prepared data has no LLM tokens")


def _init_weights(job: JobSpec, stage: StageSpec, run_dir: Location, previous: Location | None):
    source = stage.init_from
    if source is None:
        return previous
    if "/" in source:
        return Location.of(source, job.run.storage_options)
    marker = json.loads(read_bytes(run_dir.child(source, COMPLETE)))
    return Location(marker["checkpoint"], run_dir.options)


def _run_stage(job: JobSpec, index: int, run_dir: Location, shards, init) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    stage = job.stages[index]
    scaling = job.scaling
    use_gpu = scaling.gpus_per_worker > 0
    resources = {"CPU": scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    task = StageTask(job.model_dump_json(), index, run_dir, tuple(shards), init)
    storage_fs, storage_path = _ray_storage(run_dir)
    trainer = TorchTrainer(
        train_stage,
        train_loop_config=task.to_config(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=scaling.workers, use_gpu=use_gpu, resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=stage.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.run.keep_checkpoints),
        ),
    )
    log.info("train: stage %s (%d steps, %d workers)", stage.name, stage.steps, scaling.workers)
    started = time.monotonic()
    try:
        result = trainer.fit()
    except TrainingFailedError as error:
        raise TrainError(f"stage {stage.name} failed (the run resumes from its last checkpoint "
                         f"when started again): {error}") from error
    if result.error is not None or result.checkpoint is None:
        raise TrainError(f"stage {stage.name} failed: {result.error}")
    checkpoint_url = _storage_url(run_dir, result.checkpoint.path)
    metadata = json.loads(read_bytes(Location(checkpoint_url, run_dir.options).child(METADATA)))
    return {
        "stage": stage.name,
        "step": metadata["step"],
        "samples_seen": metadata["samples_seen"],
        "checkpoint": checkpoint_url,
        "final_metrics": result.metrics,
        "wall_time_s": round(time.monotonic() - started, 1),
        "metrics": run_dir.child(stage.name, METRICS).url,
        "plot": run_dir.child(stage.name, "loss.png").url,
    }


def _ray_storage(run_dir: Location):
    """Ray Train's (filesystem, path) for the run folder: local as a path, S3 through s3fs
    (pyarrow's own S3 client uploads even empty marker files as multipart uploads, which
    S3-compatible stores such as moto reject)."""
    if run_dir.is_local:
        return None, run_dir.url
    return run_dir.pyarrow_filesystem(), run_dir.filesystem()[1]


def _storage_url(run_dir: Location, path: str) -> str:
    return path if run_dir.is_local else "s3://" + path.lstrip("/")
