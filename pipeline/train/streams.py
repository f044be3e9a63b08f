"""Which data streams a worker trains, so that a stage keeps its global batch at any world size."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamPlan:
    """Which data streams a worker trains: stream ``v`` belongs to rank ``v % world_size``.

    Every step trains one batch of each of the ``total`` streams. A rank with fewer streams
    than ``per_rank`` fills the gap with zero-weight placeholder micro-steps (its collectives
    must still run), and real losses are weighted so that DeepSpeed's average over
    ``world_size * per_rank`` micro-batches equals the average over the ``total`` streams.

    Attributes:
        total: Data streams of the stage.
        mine: The streams this rank trains, in slot order.
        per_rank: Micro-step slots of every rank per accumulation step.
        loss_weight: Factor on the loss of a real micro-step.
    """

    total: int
    mine: tuple[int, ...]
    per_rank: int
    loss_weight: float

    @classmethod
    def of(cls, total: int, rank: int, world_size: int) -> "StreamPlan":
        per_rank = -(-total // world_size)
        return cls(total, tuple(range(rank, total, world_size)), per_rank, world_size * per_rank / total)


def stream_count(workers: int, data_streams: int | None, saved: dict | None) -> int:
    """A stage's data streams: a resumed stage keeps the streams it started with, whatever the
    world size now; a new one takes ``scaling.data_streams``, else one per worker."""
    if saved is not None:
        return saved.get("data_streams", saved["world_size"])
    return data_streams or workers
