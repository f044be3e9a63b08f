"""The plain single-process PyTorch optimizer step both training benchmarks run (no Ray, no
DeepSpeed): ``bench train`` measures the full path against it, ``bench step`` times it."""

from __future__ import annotations

import torch
from torch import nn


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, clip: float) -> None:
    """After ``backward()``: clip the gradients to norm ``clip`` (what DeepSpeed's
    ``gradient_clipping`` does; 0 skips it), step, and drop the gradients."""
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
