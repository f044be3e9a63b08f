"""``qformer train``: run a staged curriculum on Ray Train + DeepSpeed, resuming where it stopped.

Each stage is one Ray Train run named after the stage, inside the run folder
``{run.storage}/{run.name}/``. A finished stage leaves ``{stage}/complete.json``; running the
same job again skips finished stages and resumes the unfinished one from its latest complete
checkpoint, once the driver has checked that the spec still describes what that checkpoint
trained (``pipeline.train.resume``). Worker failures inside a stage are restarted by Ray Train
(``FailureConfig``), except errors that would repeat on every restart (a corrupt shard, unusable
initial weights): the worker that meets one records it (``{stage}/_fatal.json``), restarted
workers stop at once on it, and the driver reports it. One run at a time holds the run folder
(``pipeline.io.lease``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

from pipeline.checkpoint.format import COMPLETE, JOB, LOSS_PLOT, METADATA, METRICS, SUMMARY
from pipeline.data.prepared import (
    MANIFEST, TOKEN_COLUMNS, read_rows, read_schema, shards_from_manifest, token_matrix,
)
from pipeline.errors import EXIT_USAGE, QformerError
from pipeline.eval.periodic import PREFIX as EVAL_PREFIX
from pipeline.eval.periodic import resolve_stage_evals
from pipeline.io.lease import hold_lease
from pipeline.io.storage import (
    Location, exists, expand_inputs, read_bytes, remove_partial_writes, write_bytes_atomic,
)
from pipeline.ray_runtime import ensure_ray
from pipeline.spec import JobSpec
from pipeline.train.init_weights import check_init_sources, stage_init_source
from pipeline.train.metrics import read_records
from pipeline.train.resume import check_resumable, latest_checkpoint
from pipeline.train.progress import PROGRESS
from pipeline.train.task import FATAL, StageTask
from pipeline.train.tracking import Trackers
from pipeline.train.watch import StageView, watch_stage
from pipeline.train.worker import train_stage

log = logging.getLogger("qformer.train")


class TrainError(QformerError, RuntimeError):
    """The job cannot run as asked (no data, incompatible tokens, a stage failed)."""


def run_dir_of(job: JobSpec) -> Location:
    return Location.of(job.run.storage, job.run.storage_options).child(job.run.name)


def run_training(job: JobSpec) -> dict:
    """Run every unfinished stage in order; returns a summary (also ``summary.json``).

    Raises:
        SpecChanged: a stage would resume under a spec that changes what it trains (exit 2).
        LeaseHeld: another run holds the run folder (exit 2).
        TrainError: a stage failed.
    """
    job, vision_note = resolve_model_paths(job)
    run_dir = run_dir_of(job)
    with hold_lease(run_dir, purpose="qformer train", stale_after_s=job.run.lease_stale_after_s):
        finished = _check_resumes(job, run_dir)
        checked_inits = check_init_sources(job, run_dir)  # before any Ray work: a bad source is exit 2
        _check_held_out_count(job)  # before any Ray work too, where the shards are known by now
        for leftover in remove_partial_writes(run_dir):
            log.info("train: removed %s, left half-written by a killed run", leftover)
        ensure_ray(job.run.ray_address)
        return _train_curriculum(job, run_dir, vision_note, finished, checked_inits)


def _train_curriculum(job: JobSpec, run_dir: Location, vision_note: str, finished: dict[str, dict],
                      checked_inits) -> dict:
    shards, held_out = _split_held_out(job, _prepared_shards(job, run_dir))
    job = _resolve_evals(job, held_out)
    launch = _record_launch(job, run_dir)
    _announce(job, run_dir)
    summary = {"run": run_dir.url, "vision_tower": vision_note, "held_out": [s.url for s in held_out],
               "stages": []}
    previous: Location | None = None
    trackers = Trackers.open(job, run_dir)
    try:
        for index, stage in enumerate(job.stages):
            done = finished.get(stage.name)
            if done is None:
                init = stage_init_source(job, index, run_dir, previous, checked_inits)
                done = _run_stage(job, index, run_dir, shards, init, launch, trackers)
                write_bytes_atomic(run_dir.child(stage.name, COMPLETE), json.dumps(done, indent=1).encode())
                trackers.stage_done(done, run_dir)
            else:
                log.info("train: stage %s finished earlier (step %d); skipping", stage.name, done["step"])
            previous = Location(done["checkpoint"], run_dir.options)
            summary["stages"].append(done)
        write_bytes_atomic(run_dir.child(SUMMARY), json.dumps(summary, indent=1).encode())
    except BaseException:
        trackers.close(failed=True)
        raise
    trackers.close()
    return summary


def _check_resumes(job: JobSpec, run_dir: Location) -> dict[str, dict]:
    """Before any cluster work: refuse to resume a stage under a spec that changes what it
    trains, and say which changes are taken. Returns the finished stages to skip (a finished
    stage whose ``steps`` was raised is continued instead, and the log says so)."""
    finished = {}
    for index, stage in enumerate(job.stages):
        stage_dir = run_dir.child(stage.name)
        marker = stage_dir.child(COMPLETE)
        done = json.loads(read_bytes(marker)) if exists(marker) else None
        if done is not None and done["step"] >= stage.steps:
            finished[stage.name] = done
            continue
        checkpoint = latest_checkpoint(stage_dir)
        if checkpoint is None:
            continue
        for change in check_resumable(job, index, checkpoint):
            log.info("train: stage %s resumes with a changed spec: %s", stage.name, change)
        if done is not None:
            log.info("train: stage %s finished at step %d; continuing it to step %d (steps raised)",
                     stage.name, done["step"], stage.steps)
    return finished


def _record_launch(job: JobSpec, run_dir: Location) -> str:
    """Write ``RUN/job.json``: this job spec and, after the earlier ones, this command's launch;
    returns the launch id (workers record it with each start of a stage)."""
    marker = run_dir.child(JOB)
    launches = json.loads(read_bytes(marker)).get("launches", []) if exists(marker) else []
    launch = {"id": uuid.uuid4().hex[:12], "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
    record = {"spec": job.model_dump(mode="json"), "launches": [*launches, launch]}
    write_bytes_atomic(marker, json.dumps(record, indent=1).encode())
    return launch["id"]


def _announce(job: JobSpec, run_dir: Location) -> None:
    """What the run will do, how long it should take, and how to follow it."""
    stages = ", ".join(f"{stage.name} {stage.steps} steps" for stage in job.stages)
    log.info("train: run %s in %s: %s on %d worker(s)", job.run.name, run_dir.url, stages, job.scaling.workers)
    if job.run.about:
        log.info("train: %s", job.run.about)
    log.info("train: follow it with `qformer status %s --watch`%s", run_dir.url,
             f" or `tensorboard --logdir {job.run.storage}`" if job.run.tracking.tensorboard else "")


def resolve_model_paths(job: JobSpec) -> tuple[JobSpec, str]:
    """Make local model folders absolute (workers may run elsewhere) and apply the vision
    tower's fallback when its ``name`` cannot be loaded; returns the job and a note saying
    which tower is used."""
    model = job.model
    vision = model.vision
    note = vision.name
    reason = _unloadable_reason(vision.name) if vision.fallback else None
    if reason is not None:
        log.warning(
            "WARNING: vision tower %r cannot be loaded (%s); using the fallback %r, a randomly "
            "initialised tower: this run does NOT use pretrained vision features",
            vision.name, reason, vision.fallback,
        )
        vision = vision.model_copy(update={"name": vision.fallback})
        note = f"{vision.fallback} (FALLBACK, randomly initialised: {model.vision.name} cannot be loaded: {reason})"
    model = model.model_copy(update={
        "vision": vision.model_copy(update={"name": _absolute(vision.name)}),
        "qformer": model.qformer.model_copy(update={"bert": _absolute(model.qformer.bert)}),
        "llm": model.llm.model_copy(update={"name": _absolute(model.llm.name)}),
    })
    return job.model_copy(update={"model": model}), note


def _absolute(name: str) -> str:
    return os.path.abspath(name) if os.path.isdir(name) else name


def _unloadable_reason(name: str) -> str | None:
    """Why the tower ``name`` cannot be loaded (no such folder, no hub access, its package not
    installed), in one line; ``None`` when its config loads."""
    from transformers import AutoConfig

    from pipeline.assets import AssetError, resolve_model

    if name.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(name)):
        return f"no folder {name}"  # transformers would call it a malformed hub id
    try:
        AutoConfig.from_pretrained(resolve_model(name))
    except (OSError, ValueError, AssetError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def _prepared_shards(job: JobSpec, run_dir: Location) -> tuple[Location, ...]:
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
    shards = shards_from_manifest(manifest)
    _check_caption_end(job, prepared, shards)
    return shards


def _split_held_out(job: JobSpec, shards: tuple[Location, ...]) -> tuple[tuple[Location, ...], tuple[Location, ...]]:
    """The training shards and the last ``data.held_out_shards`` kept out of training.

    Raises:
        TrainError: nothing would be left to train on (exit status 2).
    """
    count = job.data.held_out_shards
    if count == 0:
        return shards, ()
    _check_held_out_fits(count, len(shards))
    return shards[:-count], shards[-count:]


def _check_held_out_count(job: JobSpec) -> None:
    """``data.held_out_shards`` against the shards that are known before any cluster work: the
    manifest of ``data.prepared``, or the raw inputs that ``data.raw`` prepares one to one."""
    count = job.data.held_out_shards
    if count == 0:
        return
    if job.data.prepared is not None:
        manifest = Location.of(job.data.prepared, job.data.storage).child(MANIFEST)
        if exists(manifest):
            _check_held_out_fits(count, len(shards_from_manifest(manifest)))
    else:
        try:
            inputs = expand_inputs(job.data.raw.inputs, job.data.raw.storage)
        except FileNotFoundError:
            return  # prep says which input is missing
        _check_held_out_fits(count, len(inputs))


def _check_held_out_fits(count: int, shards: int) -> None:
    if count >= shards:
        raise TrainError(f"data.held_out_shards: {count} would hold out all {shards} prepared shards; "
                         f"at most {shards - 1} can be held out, leaving one to train on",
                         exit_status=EXIT_USAGE)


def _resolve_evals(job: JobSpec, held_out: tuple[Location, ...]) -> JobSpec:
    try:
        return resolve_stage_evals(job, held_out)
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
    if _trains_with_llm(job) and "llm" not in tokenizers:
        raise TrainError("a stage trains with the LLM (lm loss) but the prepared data has no LLM tokens")


def _trains_with_llm(job: JobSpec) -> bool:
    return any(stage.objective == 2 for stage in job.stages)


def _check_caption_end(job: JobSpec, prepared: Location, shards: tuple[Location, ...]) -> None:
    """The prepared captions must end with the LLM tokenizer's end-of-text as it is now.

    Data prepared with another one (another LLM, or an older asset: SmolLM2's moved from
    ``<|im_end|>`` to ``<|endoftext|>``) would teach the LLM to end captions with a token that
    caption generation does not stop at; one row of the first shard tells.
    """
    ids_column, mask_column = TOKEN_COLUMNS["llm"]
    if not _trains_with_llm(job) or not shards:
        return
    if ids_column not in read_schema(shards[0]).names:
        return
    rows = read_rows(shards[:1], [ids_column, mask_column], 1)
    if rows.num_rows == 0:
        return
    from pipeline.model.llm import build_llm_tokenizer

    length = int(token_matrix(rows.column(mask_column))[0].sum())
    last = int(token_matrix(rows.column(ids_column))[0, length - 1])
    tokenizer = build_llm_tokenizer(job.model.llm)
    if last != tokenizer.eos_token_id:
        raise TrainError(
            f"data: {prepared.url} ends captions with token {last} "
            f"({tokenizer.convert_ids_to_tokens(last)!r}) but {job.model.llm.name}'s tokenizer ends "
            f"texts with {tokenizer.eos_token_id} ({tokenizer.eos_token!r}); run `qformer prep` on the "
            "corpus again"
        )


def _run_stage(job: JobSpec, index: int, run_dir: Location, shards, init, launch: str,
               trackers: Trackers) -> dict:
    stage = job.stages[index]
    task = StageTask(job.model_dump_json(), index, run_dir, tuple(shards), init, launch)
    log.info("train: stage %s (%d steps, %d workers): starting the workers", stage.name, stage.steps,
             job.scaling.workers)
    started = time.monotonic()
    with watch_stage(StageView(stage, trackers)) as board:
        result = _fit(job, task, board)
    if result.error is not None or result.checkpoint is None:
        raise TrainError(f"stage {stage.name} failed: {_first_line(result.error)}")
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
        "plot": run_dir.child(stage.name, LOSS_PLOT).url,
        "held_out": _last_evaluation(run_dir.child(stage.name, METRICS)),
    }


def _last_evaluation(metrics: Location) -> dict | None:
    """The stage's last held-out evaluation (``eval_*`` fields without the prefix, and its step),
    or None when the stage has no ``eval`` section."""
    evaluations = [record for record in read_records(metrics) if EVAL_PREFIX + "samples" in record]
    if not evaluations:
        return None
    last = evaluations[-1]
    return {"step": last["step"], **{k[len(EVAL_PREFIX):]: v for k, v in last.items() if k.startswith(EVAL_PREFIX)}}


def _fit(job: JobSpec, task: StageTask, board):
    """Train one stage as a Ray Train run whose rank 0 reports to ``board``; its result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    stage = job.stages[task.stage_index]
    scaling = job.scaling
    use_gpu = scaling.gpus_per_worker > 0
    resources = {"CPU": scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    storage_fs, storage_path = _ray_storage(task.run_dir)
    trainer = TorchTrainer(
        train_stage,
        train_loop_config={**task.to_config(), PROGRESS: board},
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
    try:
        return trainer.fit()
    except TrainingFailedError as error:
        fatal = task.run_dir.child(stage.name, FATAL)
        if exists(fatal) and (record := json.loads(read_bytes(fatal)))["launch"] == task.launch:
            raise TrainError(f"stage {stage.name} failed: {record['message']}",
                             exit_status=record["exit_status"]) from None
        raise TrainError(f"stage {stage.name} failed (the run resumes from its last checkpoint "
                         f"when started again): {_first_line(error)}") from error


def _first_line(error) -> str:
    """An error in one line (a failed worker's traceback is in the log)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else repr(error)


def _ray_storage(run_dir: Location):
    """Ray Train's (filesystem, path) for the run folder: local as a path, S3 through s3fs
    (pyarrow's own S3 client uploads even empty marker files as multipart uploads, which
    S3-compatible stores such as moto reject)."""
    if run_dir.is_local:
        return None, run_dir.url
    return run_dir.pyarrow_filesystem(), run_dir.filesystem()[1]


def _storage_url(run_dir: Location, path: str) -> str:
    return path if run_dir.is_local else "s3://" + path.lstrip("/")
