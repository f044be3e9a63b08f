"""The training loop each Ray Train worker runs for one stage."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from pipeline.io.storage import Location
from pipeline.spec import JobSpec
from pipeline.spec.train import StageSpec

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


def train_stage(config: dict) -> None:
    """Ray Train entry point: build the model, restore, train the stage, checkpoint."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import ray.train
    import ray.train.torch
    import transformers

    transformers.logging.set_verbosity_error()

    from pipeline.model import Blip2Pretrainer, image_preprocessing
    from pipeline.model.losses import HardNegativeSampler
    from pipeline.train.checkpoint import load_trainable_weights, restore, save_and_report
    from pipeline.train.loader import BatchStream, LoaderConfig
    from pipeline.train.metrics import MetricsLog, plot_losses
    from pipeline.train.optim import build_optimizer, build_scheduler, deepspeed_config

    task = StageTask.from_config(config)
    job = JobSpec.model_validate_json(task.job_json)
    stage = job.stages[task.stage_index]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(job.run.seed)  # identical initialisation on every rank
    model_spec = model_spec_for(job, stage)
    model = Blip2Pretrainer(model_spec, stage=stage.model_stage)
    if task.init_weights is not None:
        missing, _ = model.load_trainable_state_dict(load_trainable_weights(task.init_weights), strict=False)
        if rank == 0:
            print(f"[{stage.name}] initialised from {task.init_weights.url}; "
                  f"new (not in the source): {missing or 'none'}", flush=True)
    optimizer = build_optimizer(model, stage.optimizer)
    scheduler = build_scheduler(optimizer, stage.optimizer, stage.steps)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(job.deepspeed, stage), dist_init_required=False,
    )

    restored = restore(engine)
    start_step = restored[0]["step"] if restored else 0
    metrics_log = MetricsLog(task.run_dir.child(stage.name, "metrics.jsonl"), start_step) if rank == 0 else None
    if rank == 0 and restored:
        print(f"[{stage.name}] resumed at step {start_step}/{stage.steps}", flush=True)

    accumulation = job.deepspeed.gradient_accumulation_steps
    preprocessing = image_preprocessing(model_spec.vision)
    stream = BatchStream(
        LoaderConfig(
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
        ),
        rank=rank,
        world_size=world,
        start_step=start_step * accumulation,
    )
    samples_per_step = stage.batch_size * world * accumulation
    started = time.monotonic()
    try:
        for step in range(start_step, stage.steps):
            step_started, wait_before = time.monotonic(), stream.wait_seconds
            lr = optimizer.param_groups[0]["lr"]
            totals: dict[str, float] = {}
            tokens = 0
            for micro in range(accumulation):
                seed = step_seed(job.run.seed, task.stage_index, step * accumulation + micro, rank)
                torch.manual_seed(seed)
                if stage.model_stage == 1:
                    # Same on all ranks: the sampler draws over the gathered batch.
                    engine.module.hard_negatives = HardNegativeSampler(
                        step_seed(job.run.seed, task.stage_index, step * accumulation + micro, 0)
                    )
                batch = next(stream)
                batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
                tokens += int(batch.get("attention_mask", batch.get("llm_attention_mask")).sum())
                out = engine(**batch)
                engine.backward(out.loss)
                engine.step()
                for name, value in _losses(out, stage).items():
                    totals[name] = totals.get(name, 0.0) + value / accumulation
            done = step + 1
            step_time = time.monotonic() - step_started
            if rank == 0 and (done % stage.log_every == 0 or done == stage.steps):
                record = {
                    "step": done,
                    **{k: round(v, 6) for k, v in totals.items()},
                    "lr": lr,
                    "samples_per_s": round(samples_per_step / step_time, 3),
                    "tokens_per_s": round(tokens * world / step_time, 1),
                    "data_wait_s": round(stream.wait_seconds - wait_before, 4),
                    "step_time_s": round(step_time, 4),
                    "samples_seen": done * samples_per_step,
                }
                metrics_log.append(record)
                _print_progress(stage, record, started, start_step)
            if done % stage.checkpoint_every == 0 or done == stage.steps:
                if rank == 0:
                    metrics_log.flush()
                position = stream.position(done * accumulation)
                save_and_report(
                    engine, rank=rank, zero_stage=job.deepspeed.zero_stage,
                    metadata={"stage": stage.name, "stage_index": task.stage_index, "step": done,
                              "samples_seen": done * samples_per_step, "data_position": position,
                              "world_size": world, "zero_stage": job.deepspeed.zero_stage,
                              "spec": json.loads(task.job_json)},
                    metrics={"step": done, **totals},
                    metrics_records=metrics_log.records if rank == 0 else [],
                    name=f"step-{done:08d}",
                )
        if rank == 0:
            plot_losses(metrics_log.records, task.run_dir.child(stage.name, "loss.png"),
                        f"{job.run.name} / {stage.name}")
    finally:
        stream.close()


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
    print(
        f"[{stage.name}] step {done}/{stage.steps} | {losses} | lr {record['lr']:.2e} | "
        f"{record['samples_per_s']:.1f} samples/s | data wait {wait:.0f}% | ETA {eta:.0f}s",
        flush=True,
    )
