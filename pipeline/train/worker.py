"""The training loop each Ray Train worker runs for one stage."""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from pipeline.checkpoint.format import LOSS_PLOT, checkpoint_name
from pipeline.checkpoint.rebuild import rebuild_model
from pipeline.data.batches import PixelNormalizer, to_device
from pipeline.data.prepared import MODEL_INPUTS, text_kind
from pipeline.errors import QformerError
from pipeline.eval.periodic import PeriodicEval, progress_line, stage_evaluator
from pipeline.io.storage import Location, exists, read_bytes, write_bytes_atomic
from pipeline.model import image_preprocessing
from pipeline.spec import JobSpec
from pipeline.spec.losses import logged_fields
from pipeline.spec.train import StageSpec
from pipeline.train.checkpoint import read_metadata, remove_stale_folders, save_and_report
from pipeline.train.engine import build_engine, engine_dtypes, select_accelerator
from pipeline.train.loader import BatchStream, LoaderConfig, placeholder_batch
from pipeline.train.metrics import StepClock, console, log_line, plot_losses, step_record
from pipeline.train.progress import PROGRESS, open_channel
from pipeline.train.records import StageRecords
from pipeline.train.state import zero3_masters
from pipeline.train.seeds import data_seed
from pipeline.train.step import StepPlan, train_step
from pipeline.train.streams import StreamPlan, stream_count
from pipeline.train.task import FATAL, StageTask


@dataclass(frozen=True)
class WorkerStage:
    """One worker's view of the stage it trains.

    Attributes:
        job: The job spec.
        task: The stage's task (run folder, shards, initial weights).
        stage: The stage's spec.
        rank: This worker's rank.
        nodes: The Ray node of every rank, in rank order.
    """

    job: JobSpec
    task: StageTask
    stage: StageSpec
    rank: int
    nodes: list[str]

    @property
    def world(self) -> int:
        return len(self.nodes)


def train_stage(config: dict) -> None:
    """Ray Train entry point: build the model, restore, train the stage, checkpoint."""
    import ray.train
    import ray.train.torch
    import transformers

    select_accelerator(ray.train.torch.get_device())
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    remove_stale_folders()
    task = StageTask.from_config(config)
    job = JobSpec.model_validate_json(task.job_json)
    fatal = task.run_dir.child(job.stages[task.stage_index].name, FATAL)
    _stop_if_fatal(fatal, task.launch)
    try:
        _train(task, job, config.get(PROGRESS))
    except QformerError as error:
        if error.permanent:  # restarted workers would meet it again: they stop at once on it
            write_bytes_atomic(fatal, json.dumps({"launch": task.launch, "message": str(error),
                                                  "exit_status": error.exit_status}).encode())
        raise


def _stop_if_fatal(fatal: Location, launch: str) -> None:
    """Raise the error an earlier worker of this launch recorded, before loading anything."""
    if exists(fatal):
        record = json.loads(read_bytes(fatal))
        if record["launch"] == launch:
            raise QformerError(record["message"], exit_status=record["exit_status"])


def _train(task: StageTask, job: JobSpec, board) -> None:
    """Build the engine, restore, train the stage, checkpoint; rank 0 reports to ``board``."""
    import ray.train
    import ray.train.torch

    me = WorkerStage(job, task, job.stages[task.stage_index], ray.train.get_context().get_world_rank(),
                     _worker_nodes())
    stage = me.stage
    channel = open_channel(board if me.rank == 0 else None)  # rank 0 tells the driver

    # Resume from the checkpoint Ray Train hands us, if any: its streams, its step, its state.
    checkpoint = ray.train.get_checkpoint()
    with ExitStack() as stack:
        folder = stack.enter_context(checkpoint.as_directory()) if checkpoint else None
        saved = read_metadata(folder) if folder else None
        plan = _step_plan(me, saved, ray.train.torch.get_device())
        loader_config = _loader_config(job, task, stage, pin_memory=plan.device.type == "cuda")
        placeholder = to_device(placeholder_batch(loader_config), plan.device, plan.normalizer)
        engine = build_engine(job, stage, plan, folder=folder, saved=saved, init_weights=task.init_weights,
                              placeholder=placeholder, rank=me.rank)
    start_step = saved["step"] if saved else 0
    metrics_log = StageRecords(task.run_dir.child(stage.name), start_step, tensorboard=job.run.tracking.tensorboard,
                               attempt={"launch": task.launch, "world_size": me.world}) if me.rank == 0 else None
    if me.rank == 0 and saved:
        console(f"[{stage.name}] resumed at step {start_step}/{stage.steps} on {me.world} worker(s) "
                f"(written by {saved['world_size']})")

    evaluator, eval_model = stage_evaluator(job, stage, rank=me.rank, world=me.world), _EvalModel(job, stage)
    # One stream per data stream this worker trains; a stream's batches depend only on the step.
    batches = [BatchStream(loader_config, rank=v, world_size=plan.streams.total,
                           start_step=start_step * plan.accumulation) for v in plan.streams.mine]
    clock = StepClock(start_step, stage.steps)
    try:
        for step in range(start_step, stage.steps):
            clock.start(lr=engine.optimizer.param_groups[0]["lr"], wait=_data_wait(batches))
            sums = train_step(engine, plan, batches, placeholder, step)
            done = step + 1
            logs = done % stage.log_every == 0 or done == stage.steps
            checkpoints = done % stage.checkpoint_every == 0 or done == stage.steps
            # Every stream's losses, averaged over all ranks (a collective: all ranks decide alike).
            means = _global_means(sums, plan.micro_batches) if logs or checkpoints else None
            if logs and me.rank == 0:
                _log_step(metrics_log, clock, stage, plan, done, means, _data_wait(batches))
            if evaluator is not None and evaluator.due(done):
                _evaluate(evaluator, eval_model(engine), stage, done, metrics_log)
            if checkpoints:
                _checkpoint(me, engine, plan, batches, done, loss=means[0], metrics_log=metrics_log,
                            resumed_from=start_step if saved else None)
        if me.rank == 0:
            plot_losses(metrics_log.records, task.run_dir.child(stage.name, LOSS_PLOT),
                        f"{job.run.name} / {stage.name}")
    finally:
        for stream in batches:
            stream.close()
        if metrics_log is not None:
            metrics_log.close()
        channel.close()


def _step_plan(me: WorkerStage, saved: dict | None, device: torch.device) -> StepPlan:
    scaling, objective = me.job.scaling, me.stage.objective
    streams = StreamPlan.of(stream_count(scaling.workers, scaling.data_streams, saved), me.rank, me.world)
    preprocessing = image_preprocessing(me.job.model.vision)
    return StepPlan(streams, me.job.deepspeed.gradient_accumulation_steps, me.stage.batch_size, me.job.run.seed,
                    me.task.stage_index, logged_fields(objective), MODEL_INPUTS[text_kind(objective)][1], device,
                    PixelNormalizer(preprocessing.mean, preprocessing.std))


def _data_wait(batches: list[BatchStream]) -> float:
    return sum(stream.wait_seconds for stream in batches)


def _log_step(metrics_log: StageRecords, clock: StepClock, stage: StageSpec, plan: StepPlan, done: int,
              means: list[float], data_wait: float) -> None:
    """Rank 0: the step's record (``metrics.jsonl``, TensorBoard, the driver) and its log line."""
    record = step_record(done, plan.loss_fields, means, clock.stop(wait=data_wait),
                         samples_per_step=plan.samples_per_step, micro_batches=plan.micro_batches)
    metrics_log.append(record)
    log_line(clock.progress_line(stage.name, record))


def _loader_config(job: JobSpec, task: StageTask, stage: StageSpec, *, pin_memory: bool) -> LoaderConfig:
    return LoaderConfig(
        shards=task.shards,
        batch_size=stage.batch_size,
        image_size=image_preprocessing(job.model.vision).image_size,
        text=text_kind(stage.objective),
        augment=stage.augmentation.enabled,
        crop_scale=stage.augmentation.crop_scale,
        hflip=stage.augmentation.hflip,
        seed=data_seed(job.run.seed, task.stage_index),
        prefetch_batches=job.data.prefetch_batches,
        decode_threads=job.data.decode_threads,
        pin_memory=pin_memory,
    )


def _global_means(sums: torch.Tensor, count: int) -> list[float]:
    """Per-field sums over every rank's real micro-steps, divided by their ``count`` (a collective)."""
    import torch.distributed as dist

    total = sums.clone()  # all_reduce works in place: the caller's sums stay this rank's
    dist.all_reduce(total)
    return (total / count).tolist()


class _EvalModel:
    """The module periodic evaluation scores: the engine's own, or under ZeRO-3, whose parameters
    are partitioned, a plain copy (built at the first evaluation) holding the gathered weights."""

    def __init__(self, job: JobSpec, stage: StageSpec):
        self.job, self.stage, self._copy = job, stage, None

    def __call__(self, engine) -> torch.nn.Module:
        if self.job.deepspeed.zero_stage < 3:
            return engine.module
        weights = zero3_masters(engine)  # a collective: every rank gathers
        if self._copy is None:
            self._copy = rebuild_model(self.job.model, self.stage.objective, weights, "the training engine")
        else:
            self._copy.load_trainable_state_dict(weights)
        return self._copy


def _evaluate(evaluator: PeriodicEval, model: torch.nn.Module, stage: StageSpec, step: int,
              metrics_log: StageRecords | None) -> None:
    """Periodic held-out evaluation (every rank scores its share); rank 0 logs the record."""
    record = evaluator.run(model, step)
    if record is not None:
        metrics_log.append(record)
        log_line(progress_line(stage, record))


def _checkpoint(me: WorkerStage, engine, plan: StepPlan, batches: list[BatchStream], done: int, *,
                loss: float, metrics_log: StageRecords | None, resumed_from: int | None) -> None:
    """Write and report the checkpoint of step ``done`` (every rank; Ray Train registers it)."""
    job, stage = me.job, me.stage
    if me.rank == 0:
        metrics_log.flush()
    position = batches[0].position(done * plan.accumulation) if batches else None
    save_and_report(
        engine, rank=me.rank,
        metadata={"stage": stage.name, "stage_index": me.task.stage_index, "step": done,
                  "samples_seen": done * plan.samples_per_step, "data_position": position,
                  "data_streams": plan.streams.total, "world_size": me.world, "worker_nodes": me.nodes,
                  "resumed_from_step": resumed_from, "zero_stage": job.deepspeed.zero_stage,
                  "dtypes": engine_dtypes(engine), "spec": json.loads(me.task.job_json)},
        metrics={"step": done, "loss": loss},
        metrics_records=metrics_log.records if me.rank == 0 else [],
        name=checkpoint_name(done),
    )


def _worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (a collective)."""
    import ray
    import torch.distributed as dist

    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return nodes
