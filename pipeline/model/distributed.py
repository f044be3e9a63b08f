"""The process group the losses gather features over.

Gradient bookkeeping for gathered features: every rank computes its losses on its *local* rows
against the gathered batch, so the global loss is the mean of the per-rank losses. The backward
of :func:`all_gather_with_grad` sums, over all ranks, the gradient each rank's loss sends to a
feature and hands the sum to the rank that owns the feature. Each rank's parameter gradient is
then the gradient of the *sum* of the per-rank losses through its own features; DDP/DeepSpeed
average gradients over ranks, which turns that sum into the gradient of the mean, i.e. exactly the
gradient of the single-process loss on the concatenated batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the data-parallel group.

    Attributes:
        rank: Index of this process, ``0 <= rank < world_size``.
        world_size: Number of processes whose batches are gathered.
    """

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> DistContext:
        """The default process group if ``torch.distributed`` is initialised, else one process."""
        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size())
        return cls()


def all_gather(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, without gradient.

    Args:
        tensor: (N, ...) with the same shape on every rank.
        ctx: The process group.

    Returns:
        (world_size * N, ...), rank ``r``'s rows at ``r * N : (r + 1) * N``.
    """
    if ctx.world_size == 1:
        return tensor.detach()
    return _gather_rows(tensor.detach(), ctx.world_size)


def _gather_rows(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """(N, ...) on every rank -> (world_size * N, ...), no autograd."""
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(autograd_ctx, tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        autograd_ctx.rank, autograd_ctx.rows = rank, tensor.shape[0]
        return _gather_rows(tensor, world_size)

    @staticmethod
    def backward(autograd_ctx, grad: torch.Tensor):
        # Gloo has no reduce_scatter; an all-reduce then a slice gives the same result.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = autograd_ctx.rank * autograd_ctx.rows
        return grad[start : start + autograd_ctx.rows], None, None


def all_gather_with_grad(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping the graph.

    The gradient reaching each slot is summed over ranks and returned to the rank that owns it
    (see the module docstring for why that makes DDP gradients match one process).

    Args:
        tensor: (N, ...) with the same shape on every rank.
        ctx: The process group.

    Returns:
        (world_size * N, ...), rank ``r``'s rows at ``r * N : (r + 1) * N``.
    """
    if ctx.world_size == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, ctx.rank, ctx.world_size)
