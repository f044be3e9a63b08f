"""The optimizer, its learning-rate schedule and the DeepSpeed config of a stage."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pipeline.spec.train import DeepSpeedSpec, OptimizerSpec, StageSpec


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only; weight decay on matrices, none on 1-D tensors (biases,
    norms, the temperature) as LAVIS and nanoGPT do."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decay = [p for _, p in trainable if p.ndim >= 2]
    no_decay = [p for _, p in trainable if p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, spec: OptimizerSpec) -> torch.optim.AdamW:
    """AdamW over the trainable parameters."""
    return torch.optim.AdamW(
        parameter_groups(model, spec.weight_decay), lr=spec.lr, betas=spec.betas, eps=spec.eps
    )


def lr_at(step: int, spec: OptimizerSpec, total_steps: int) -> float:
    """Learning rate after ``step`` optimizer steps: linear warm-up, then cosine to ``min_lr``.

    Not transformers' ``get_cosine_with_min_lr_schedule_with_warmup``: its warm-up starts at
    ``step / warmup`` (the first optimizer step runs at learning rate 0, a wasted step) where
    this one starts at ``(step + 1) / warmup``, as LAVIS's does; after the warm-up both follow
    the same cosine (tests/train/test_optim.py compares them at every step).
    """
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    decay_steps = max(1, total_steps - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / decay_steps)
    return spec.min_lr + 0.5 * (spec.lr - spec.min_lr) * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, spec: OptimizerSpec, total_steps: int):
    """A ``LambdaLR`` following :func:`lr_at`; its state is saved in DeepSpeed checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, spec, total_steps) / spec.lr
    )


def deepspeed_config(spec: DeepSpeedSpec, stage: StageSpec, streams_per_worker: int = 1) -> dict[str, Any]:
    """The DeepSpeed config of one stage (optimizer and scheduler are passed as objects).

    A worker that trains several data streams runs their batches as extra accumulation
    micro-steps, so DeepSpeed accumulates ``gradient_accumulation_steps * streams_per_worker``.
    """
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": stage.batch_size,
        "gradient_accumulation_steps": spec.gradient_accumulation_steps * streams_per_worker,
        "gradient_clipping": spec.gradient_clipping,
        "zero_optimization": zero_config(spec.zero_stage),
        "bf16": {"enabled": spec.precision == "bf16"},
        "fp16": {"enabled": spec.precision == "fp16"},
        # Keep torch's AdamW: DeepSpeed would otherwise insist on its own CPU Adam on CPU.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, spec.overrides)


BUCKET_ELEMENTS = 50_000_000
"""Gradient reduction bucket: a quarter of a ~200M-parameter Q-Former, so reduction starts
during backward instead of after it (DeepSpeed's default, 5e8, is larger than the model)."""


def zero_config(stage: int) -> dict[str, Any]:
    """ZeRO settings of a stage: gradients reduced in buckets while backward runs (overlapped
    with it), into one contiguous buffer; under ZeRO-3, parameters prefetched a bucket ahead.
    ``deepspeed.overrides`` can change any of them."""
    config: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        config.update(overlap_comm=True, contiguous_gradients=True, reduce_scatter=True,
                      reduce_bucket_size=BUCKET_ELEMENTS, allgather_bucket_size=BUCKET_ELEMENTS)
    if stage == 3:
        config.update(stage3_prefetch_bucket_size=BUCKET_ELEMENTS,
                      stage3_param_persistence_threshold=100_000)
    return config


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
