"""The process group the losses gather features over.

Collectives move only what is used: features are gathered into one tensor in one call, their
gradients reduce-scattered back; ITM's negative images are fetched row by row from the ranks that
hold them (:func:`fetch_rows`) rather than gathered whole.

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
    """(N, ...) on every rank -> (world_size * N, ...) in one collective, no autograd."""
    out = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_single(out, tensor.contiguous())
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(autograd_ctx, tensor: torch.Tensor, world_size: int) -> torch.Tensor:
        autograd_ctx.world_size = world_size
        return _gather_rows(tensor, world_size)

    @staticmethod
    def backward(autograd_ctx, grad: torch.Tensor):
        # Each rank gets the sum over ranks of the gradient of its own rows.
        rows = grad.shape[0] // autograd_ctx.world_size
        out = grad.new_empty((rows, *grad.shape[1:]))
        dist.reduce_scatter_single(out, grad.contiguous(), op=dist.ReduceOp.SUM)
        return out, None


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
    return _AllGatherWithGrad.apply(tensor, ctx.world_size)


def fetch_rows(local: torch.Tensor, requests: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The rows of the gathered batch that this rank asks for, fetched from the ranks that hold
    them, without gathering the rest (one ``all_to_all``), and without gradient.

    Args:
        local: (B, ...) this rank's rows, the same shape on every rank.
        requests: (W * B,) every rank's requests, the same on every rank: rank ``r`` asks for
            gathered rows ``requests[r * B : (r + 1) * B]`` (row ``i`` is held by rank ``i // B``).
        ctx: The process group.

    Returns:
        (B, ...) the rows this rank asked for, in the order it asked.
    """
    batch = local.shape[0]
    mine = requests[ctx.rank * batch : (ctx.rank + 1) * batch]  # (B,)
    if ctx.world_size == 1:
        return local.detach()[mine]
    owner = (requests // batch).cpu()  # (W * B,)
    asker = torch.arange(requests.numel()) // batch  # (W * B,)
    sent = (owner == ctx.rank).nonzero().squeeze(1)  # positions asked of this rank, by asker
    send_counts = torch.bincount(asker[sent], minlength=ctx.world_size).tolist()
    my_owners = owner[ctx.rank * batch : (ctx.rank + 1) * batch]  # (B,)
    receive_counts = torch.bincount(my_owners, minlength=ctx.world_size).tolist()
    outgoing = local.detach()[requests[sent.to(requests.device)] - ctx.rank * batch].contiguous()
    incoming = local.new_empty((batch, *local.shape[1:]))  # by owner, then in asking order
    dist.all_to_all_single(incoming, outgoing, receive_counts, send_counts)
    order = torch.argsort(my_owners, stable=True).to(local.device)  # incoming row k is my row order[k]
    rows = torch.empty_like(incoming)
    rows[order] = incoming
    return rows
