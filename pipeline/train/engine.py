"""A stage's DeepSpeed engine: the model built, initialised or restored, wrapped with its optimizer."""

from __future__ import annotations

import torch

from pipeline.checkpoint.format import TRAINABLE
from pipeline.checkpoint.initial import load_initial_weights
from pipeline.checkpoint.sources import InitSource
from pipeline.model import Blip2Pretrainer
from pipeline.spec import JobSpec
from pipeline.spec.train import StageSpec
from pipeline.train.checkpoint import needs_portable_load, restore
from pipeline.train.loader import Batch
from pipeline.train.metrics import console
from pipeline.train.optim import build_optimizer, build_scheduler, deepspeed_config
from pipeline.train.seeds import init_seed
from pipeline.train.step import StepPlan


def build_engine(job: JobSpec, stage: StageSpec, plan: StepPlan, *, folder: str | None, saved: dict | None,
                 init_weights: InitSource | None, placeholder: Batch, rank: int):
    """The DeepSpeed engine of the stage, holding the checkpoint's state when resuming.

    Args:
        job: The job spec.
        stage: The stage.
        plan: The stage's step plan (its streams set DeepSpeed's accumulation).
        folder: The local copy of the checkpoint to resume from, or None.
        saved: That checkpoint's metadata, or None.
        init_weights: What a new stage starts from (``init_from``), or None.
        placeholder: A zero-weight batch (restoring at another world size steps once on it).
        rank: This worker's rank (rank 0 reports on the console).
    """
    import deepspeed
    from safetensors.torch import load_file

    world = torch.distributed.get_world_size()
    portable = saved is not None and needs_portable_load(saved, world_size=world, zero_stage=job.deepspeed.zero_stage)
    torch.manual_seed(init_seed(job.run.seed))
    model = Blip2Pretrainer(job.model, objective=stage.objective, loss_weights=stage.losses)
    if portable:
        model.load_trainable_state_dict(load_file(f"{folder}/{TRAINABLE}"))
    elif saved is None and init_weights is not None:
        load_initial_weights(model, init_weights, say=console if rank == 0 else None)
    optimizer = build_optimizer(model, stage.optimizer)
    scheduler = build_scheduler(optimizer, stage.optimizer, stage.steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, dist_init_required=False,
        config=deepspeed_config(job.deepspeed, stage, streams_per_worker=plan.streams.per_rank),
    )
    if saved is not None:

        def warmup_step(weight: float) -> None:
            for _ in range(plan.micro_steps):
                engine.backward(engine(**placeholder).loss * weight)
                engine.step()

        restore(engine, folder, saved, portable=portable, warmup_step=warmup_step)
    return engine
