"""A stage's DeepSpeed engine: the model built, initialised or restored, wrapped with its optimizer.

DeepSpeed manages only the trainable modules: the model's frozen towers are held beside them
(``pipeline.model.frozen.FrozenTowers``), so they keep the dtype the spec names, are never
partitioned and never reach a checkpoint.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from pipeline.checkpoint.format import TRAINABLE
from pipeline.checkpoint.initial import load_initial_weights
from pipeline.checkpoint.sources import InitSource
from pipeline.model import Blip2Pretrainer
from pipeline.spec import JobSpec
from pipeline.spec.train import StageSpec
from pipeline.train.checkpoint import restore
from pipeline.train.metrics import console, log_line
from pipeline.train.optim import build_optimizer, build_scheduler, deepspeed_config
from pipeline.train.seeds import init_seed
from pipeline.train.state import set_masters
from pipeline.train.step import StepPlan


def select_accelerator(device: torch.device) -> str:
    """Point DeepSpeed at the accelerator of ``device`` (the one Ray Train gave this worker),
    before DeepSpeed is first used in this process; returns its name.

    Set per worker, not inherited: a driver without GPUs (or an earlier CPU run in the same
    shell) must not make GPU workers start DeepSpeed on its CPU backend.
    """
    name = "cpu" if device.type == "cpu" else device.type
    os.environ["DS_ACCELERATOR"] = name
    return name


def build_engine(job: JobSpec, stage: StageSpec, plan: StepPlan, *, folder: str | None, saved: dict | None,
                 init_weights: InitSource | None, placeholder: dict[str, torch.Tensor], rank: int):
    """The DeepSpeed engine of the stage, holding the checkpoint's state when resuming.

    Args:
        job: The job spec.
        stage: The stage.
        plan: The stage's step plan (its streams set DeepSpeed's accumulation).
        folder: The local copy of the checkpoint to resume from, or None.
        saved: That checkpoint's metadata, or None.
        init_weights: What a new stage starts from (``init_from``), or None.
        placeholder: A zero-weight batch on the device (restoring steps once on it).
        rank: This worker's rank (rank 0 reports on the console).
    """
    import deepspeed

    torch.manual_seed(init_seed(job.run.seed))
    model = Blip2Pretrainer(job.model, objective=stage.objective, loss_weights=stage.losses,
                            qformer_dropout=stage.qformer_dropout)
    if saved is not None:
        model.load_trainable_state_dict(load_file(f"{folder}/{TRAINABLE}"))
    elif init_weights is not None:
        report = load_initial_weights(model, init_weights)
        if rank == 0:  # the counts on the console, every tensor in the log
            console(f"[{stage.name}] {report.summary()}")
            for line in report.tensor_lines():
                log_line(line)
    # fp32, before DeepSpeed rounds the working copies to the training precision.
    initial = {name: tensor.clone() for name, tensor in model.trainable_state_dict().items()}
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

        restore(engine, folder, saved, warmup_step=warmup_step)
    else:
        # DeepSpeed built its fp32 masters from the rounded working copies: give them the
        # exact weights (BERT's, init_from's) instead.
        set_masters(engine, initial)
    return engine


def engine_dtypes(engine) -> dict[str, str]:
    """What ran: each frozen tower's dtype, the trainable working copies', the masters'."""
    working = next(p for p in engine.module.parameters() if p.requires_grad).dtype
    return {**engine.module.towers.dtypes(), "trainable": str(working).removeprefix("torch."),
            "masters": "float32"}
