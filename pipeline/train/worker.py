"""The training loop each Ray Train worker runs for one stage."""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from pipeline.io.storage import Location
from pipeline.model.losses import HardNegativeSampler
from pipeline.spec import JobSpec
from pipeline.spec.train import StageSpec
from pipeline.train.metrics import console

STAGE1_LOSS_FIELDS = {"itc": "loss_itc", "itm": "loss_itm", "itg": "loss_itg"}


@dataclass(frozen=True)
class StageTask:
    """What a worker needs to train one stage (travels as ``train_loop_config``)."""

    job_json: str
    stage_index: int
    run_dir: Location
    shards: tuple[Location, ...]
    init_weights: Location | None

    def to_config(self) -> dict:
        return {
            "job": self.job_json,
            "stage_index": self.stage_index,
            "run_dir": [self.run_dir.url, self.run_dir.options],
            "shards": [[s.url, s.options] for s in self.shards],
            "init_weights": [self.init_weights.url, self.init_weights.options] if self.init_weights else None,
        }

    @classmethod
    def from_config(cls, config: dict) -> "StageTask":
        init = config["init_weights"]
        return cls(
            job_json=config["job"],
            stage_index=config["stage_index"],
            run_dir=Location(*config["run_dir"]),
            shards=tuple(Location(url, options) for url, options in config["shards"]),
            init_weights=Location(*init) if init else None,
        )


def step_seed(base: int, stage_index: int, step: int, rank: int) -> int:
    """A seed for one (stage, step, rank): the randomness of a step does not depend on whether
    the run was resumed before it."""
    return (base * 1_000_003 + stage_index * 10_007 + step * 101 + rank) % (2**63 - 1)


def model_spec_for(job: JobSpec, stage: StageSpec):
    """The model spec with this stage's loss weights (absent losses weigh 0)."""
    weights = {f"{name}_weight": stage.losses.get(name, 0.0) for name in ("itc", "itm", "itg", "lm")}
    return job.model.model_copy(update={"losses": job.model.losses.model_copy(update=weights)})


@dataclass(frozen=True)
class StreamPlan:
    """Which data streams a worker trains: stream ``v`` belongs to rank ``v % world_size``.

    Every step trains one batch of each of the ``total`` streams. A rank with fewer streams
    than ``per_rank`` fills the gap with zero-weight placeholder micro-steps (its collectives
    must still run), and real losses are weighted so that DeepSpeed's average over
    ``world_size * per_rank`` micro-batches equals the average over the ``total`` streams.
    """

    total: int
    mine: tuple[int, ...]
    per_rank: int
    loss_weight: float

    @classmethod
    def of(cls, total: int, rank: int, world_size: int) -> "StreamPlan":
        per_rank = -(-total // world_size)
        return cls(total, tuple(range(rank, total, world_size)), per_rank, world_size * per_rank / total)


def train_stage(config: dict) -> None:
    """Ray Train entry point: build the model, restore, train the stage, checkpoint."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import ray.train
    import ray.train.torch
    import transformers

    transformers.logging.set_verbosity_error()

    from pipeline.eval.periodic import stage_evaluator
    from pipeline.train.checkpoint import read_metadata, save_and_report
    from pipeline.train.loader import BatchStream, placeholder_batch
    from pipeline.train.metrics import MetricsLog, plot_losses

    task = StageTask.from_config(config)
    job = JobSpec.model_validate_json(task.job_json)
    stage = job.stages[task.stage_index]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    nodes = _worker_nodes()

    checkpoint = ray.train.get_checkpoint()
    with ExitStack() as stack:
        folder = stack.enter_context(checkpoint.as_directory()) if checkpoint else None
        saved = read_metadata(folder) if folder else None
        streams = StreamPlan.of(_stream_count(job, saved), rank, world)
        loader_config = _loader_config(job, task, stage)
        placeholder = {k: v.to(device) for k, v in placeholder_batch(loader_config).items()}
        engine = _build_engine(job, task, stage, streams, rank, world, folder, saved, placeholder)
    start_step = saved["step"] if saved else 0
    metrics_log = MetricsLog(task.run_dir.child(stage.name, "metrics.jsonl"), start_step) if rank == 0 else None
    if rank == 0 and saved:
        console(f"[{stage.name}] resumed at step {start_step}/{stage.steps} on {world} worker(s) "
                f"(written by {saved['world_size']})")

    evaluator = stage_evaluator(job, stage, rank=rank, world=world)
    accumulation = job.deepspeed.gradient_accumulation_steps
    batches = [BatchStream(loader_config, rank=v, world_size=streams.total, start_step=start_step * accumulation)
               for v in streams.mine]
    samples_per_step = stage.batch_size * streams.total * accumulation
    loss_names = ["loss", *(STAGE1_LOSS_FIELDS.values() if stage.model_stage == 1 else ["loss_lm"])]
    started = time.monotonic()
    try:
        for step in range(start_step, stage.steps):
            step_started = time.monotonic()
            wait_before = sum(b.wait_seconds for b in batches)
            lr = engine.optimizer.param_groups[0]["lr"]
            sums = torch.zeros(len(loss_names) + 1, dtype=torch.float64)  # losses..., tokens
            for micro in range(accumulation):
                for slot in range(streams.per_rank):
                    if stage.model_stage == 1:
                        # Same on all ranks: the sampler draws over the gathered batch.
                        engine.module.hard_negatives = HardNegativeSampler(step_seed(
                            job.run.seed, task.stage_index, (step * accumulation + micro) * streams.per_rank + slot, 0))
                    if slot < len(streams.mine):
                        stream = streams.mine[slot]
                        torch.manual_seed(step_seed(job.run.seed, task.stage_index, step * accumulation + micro, stream))
                        batch = {k: v.to(device) for k, v in next(batches[slot]).items()}
                        weight = streams.loss_weight
                    else:
                        batch, weight = placeholder, 0.0
                    out = engine(**batch)
                    engine.backward(out.loss * weight)
                    engine.step()
                    if weight:
                        sums[:-1] += torch.tensor([_losses(out, stage)[name] for name in loss_names], dtype=torch.float64)
                        sums[-1] += float(_token_mask(batch).sum())
            done = step + 1
            if done % stage.log_every == 0 or done == stage.steps:
                totals = _global_means(sums, streams.total * accumulation, device)
                step_time = time.monotonic() - step_started
                if rank == 0:
                    record = {
                        "step": done,
                        **{name: round(value, 6) for name, value in zip(loss_names, totals[:-1])},
                        "lr": lr,
                        "samples_per_s": round(samples_per_step / step_time, 3),
                        "tokens_per_s": round(totals[-1] * streams.total * accumulation / step_time, 1),
                        "data_wait_s": round(sum(b.wait_seconds for b in batches) - wait_before, 4),
                        "step_time_s": round(step_time, 4),
                        "samples_seen": done * samples_per_step,
                    }
                    metrics_log.append(record)
                    _print_progress(stage, record, started, start_step)
            if evaluator is not None:
                evaluator.after_step(engine, job.deepspeed.zero_stage, done, metrics_log)
            if done % stage.checkpoint_every == 0 or done == stage.steps:
                if rank == 0:
                    metrics_log.flush()
                position = batches[0].position(done * accumulation) if batches else None
                save_and_report(
                    engine, rank=rank, zero_stage=job.deepspeed.zero_stage,
                    metadata={"stage": stage.name, "stage_index": task.stage_index, "step": done,
                              "samples_seen": done * samples_per_step, "data_position": position,
                              "data_streams": streams.total, "world_size": world, "worker_nodes": nodes,
                              "resumed_from_step": start_step if saved else None,
                              "zero_stage": job.deepspeed.zero_stage, "spec": json.loads(task.job_json)},
                    metrics={"step": done, "loss": float(sums[0]) / max(1, len(streams.mine) * accumulation)},
                    metrics_records=metrics_log.records if rank == 0 else [],
                    name=f"step-{done:08d}",
                )
        if rank == 0:
            plot_losses(metrics_log.records, task.run_dir.child(stage.name, "loss.png"),
                        f"{job.run.name} / {stage.name}")
    finally:
        for stream in batches:
            stream.close()


def _stream_count(job: JobSpec, saved: dict | None) -> int:
    """A resumed stage keeps the data streams it started with, whatever the world size now."""
    if saved is not None:
        return saved.get("data_streams", saved["world_size"])
    return job.scaling.data_streams or job.scaling.workers


def _loader_config(job: JobSpec, task: StageTask, stage: StageSpec):
    from pipeline.model import image_preprocessing
    from pipeline.train.loader import LoaderConfig

    preprocessing = image_preprocessing(job.model.vision)
    return LoaderConfig(
        shards=task.shards,
        batch_size=stage.batch_size,
        image_size=preprocessing.image_size,
        mean=preprocessing.mean,
        std=preprocessing.std,
        text="llm" if stage.model_stage == 2 else "qformer",
        augment=stage.augmentation.enabled,
        crop_scale=stage.augmentation.crop_scale,
        hflip=stage.augmentation.hflip,
        seed=job.run.seed + task.stage_index,
        prefetch_batches=job.data.prefetch_batches,
        decode_threads=job.data.decode_threads,
    )


def _build_engine(job: JobSpec, task: StageTask, stage: StageSpec, streams: StreamPlan, rank: int,
                  world: int, folder: str | None, saved: dict | None, placeholder: dict):
    """The DeepSpeed engine of the stage, holding the checkpoint's state when resuming."""
    import deepspeed
    from safetensors.torch import load_file

    from pipeline.model import Blip2Pretrainer
    from pipeline.train.checkpoint import TRAINABLE, load_trainable_weights, needs_portable_load, restore
    from pipeline.train.optim import build_optimizer, build_scheduler, deepspeed_config

    portable = saved is not None and needs_portable_load(saved, world_size=world, zero_stage=job.deepspeed.zero_stage)
    torch.manual_seed(job.run.seed)  # identical initialisation on every rank
    model = Blip2Pretrainer(model_spec_for(job, stage), stage=stage.model_stage)
    if portable:
        model.load_trainable_state_dict(load_file(f"{folder}/{TRAINABLE}"))
    elif saved is None and task.init_weights is not None:
        missing, _ = model.load_trainable_state_dict(load_trainable_weights(task.init_weights), strict=False)
        if rank == 0:
            console(f"[{stage.name}] initialised from {task.init_weights.url}; "
                    f"new (not in the source): {missing or 'none'}")
    optimizer = build_optimizer(model, stage.optimizer)
    scheduler = build_scheduler(optimizer, stage.optimizer, stage.steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, dist_init_required=False,
        config=deepspeed_config(job.deepspeed, stage, streams_per_worker=streams.per_rank),
    )
    if saved is not None:
        micro_steps = job.deepspeed.gradient_accumulation_steps * streams.per_rank

        def warmup_step(weight: float) -> None:
            for _ in range(micro_steps):
                if stage.model_stage == 1:
                    engine.module.hard_negatives = HardNegativeSampler(job.run.seed)
                engine.backward(engine(**placeholder).loss * weight)
                engine.step()

        restore(engine, folder, saved, portable=portable, warmup_step=warmup_step)
    return engine


def _worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (a collective)."""
    import ray
    import torch.distributed as dist

    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return nodes


def _global_means(sums: torch.Tensor, count: int, device) -> list[float]:
    """Per-name sums over every rank's real micro-batches, divided by their ``count`` (a collective);
    the last entry (tokens) is averaged the same way."""
    import torch.distributed as dist

    total = sums.to(device)
    dist.all_reduce(total)
    return (total / count).tolist()


def _token_mask(batch: dict) -> torch.Tensor:
    return batch["attention_mask"] if "attention_mask" in batch else batch["llm_attention_mask"]


def _losses(out, stage: StageSpec) -> dict[str, float]:
    values = {"loss": float(out.loss.detach())}
    if stage.model_stage == 1:
        for name, field in STAGE1_LOSS_FIELDS.items():
            values[field] = float(getattr(out, field).detach())
    else:
        values["loss_lm"] = float(out.loss_lm.detach())
    return values


def _print_progress(stage: StageSpec, record: dict, started: float, start_step: int) -> None:
    done = record["step"]
    elapsed = time.monotonic() - started
    eta = elapsed / max(1, done - start_step) * (stage.steps - done)
    losses = " ".join(f"{k[5:] or 'total'} {v:.4f}" for k, v in record.items() if k.startswith("loss"))
    wait = 100 * record["data_wait_s"] / max(record["step_time_s"], 1e-9)
    console(
        f"[{stage.name}] step {done}/{stage.steps} | {losses} | lr {record['lr']:.2e} | "
        f"{record['samples_per_s']:.1f} samples/s | data wait {wait:.0f}% | ETA {eta:.0f}s"
    )
