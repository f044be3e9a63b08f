"""The learning-rate schedule, against transformers' cosine schedule with a floor."""

from __future__ import annotations

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from pipeline.spec.train import OptimizerSpec
from pipeline.train.optim import build_scheduler


def _lrs(scheduler, steps: int) -> list[float]:
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return values


def test_schedule_is_transformers_cosine_after_a_warm_up_that_never_runs_at_zero():
    spec = OptimizerSpec(lr=1e-3, min_lr=1e-4, warmup_steps=5)
    steps = 30
    ours = _lrs(build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=spec.lr), spec, steps), steps)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=spec.lr)
    theirs = _lrs(get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=spec.warmup_steps, num_training_steps=steps, min_lr=spec.min_lr), steps)
    warmup = spec.warmup_steps
    assert ours[warmup:] == pytest.approx(theirs[warmup:], rel=1e-12)
    # transformers' warm-up spends its first step at learning rate 0; ours is one step ahead.
    assert theirs[0] == 0 and ours[:warmup] == pytest.approx([spec.lr * (i + 1) / warmup for i in range(warmup)])
    assert ours[-1] > spec.min_lr and ours[-1] == pytest.approx(min(ours))
