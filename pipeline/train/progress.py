"""How rank 0 tells the driver how its stage goes: a small Ray actor the driver creates per stage
(:class:`ProgressBoard`) that rank 0 sends its step and evaluation records and its notes to, and
the driver takes them from (``pipeline.train.watch``).

Why an actor: it reaches the driver within a second wherever the driver and rank 0 run (one
machine, a cluster, a Ray Job), whatever the run's storage (``metrics.jsonl`` reaches object
storage only at checkpoints); Ray Train's own ``report`` is a barrier every rank must call, and
its results reach the driver only when ``fit`` returns. Sending is fire-and-forget: a slow or
gone driver never holds training up.
"""

from __future__ import annotations

PROGRESS = "progress"
"""The ``train_loop_config`` key holding the board's actor handle."""


class ProgressBoard:
    """Ray actor (``num_cpus=0``): keeps what rank 0 sent until the driver takes it."""

    def __init__(self):
        self._items: list[tuple[str, object]] = []

    def put(self, item: tuple[str, object]) -> None:
        self._items.append(item)

    def take(self) -> list[tuple[str, object]]:
        items, self._items = self._items, []
        return items


class DriverChannel:
    """Rank 0's end: sends ``("record", dict)`` and ``("note", str)`` items to the board."""

    def __init__(self, board):
        self.board = board
        self._last = None

    def send(self, kind: str, payload) -> None:
        if self.board is None:
            return
        try:
            self._last = self.board.put.remote((kind, payload))
        except Exception:  # the driver is gone (its actors with it): training goes on
            self.board = None

    def close(self, timeout_s: float = 10.0) -> None:
        """Wait (a little) until what was sent has arrived: a worker's calls still in flight
        when its process ends are lost."""
        import ray

        if self._last is not None:
            ray.wait([self._last], timeout=timeout_s)
        self.board = None


_channel: DriverChannel | None = None


def open_channel(board) -> DriverChannel:
    """This worker's channel to the driver (``board`` None: a driver that watches nothing)."""
    global _channel
    _channel = DriverChannel(board)
    return _channel


def send(kind: str, payload) -> None:
    """Send an item to the driver if this worker has an open channel (rank 0)."""
    if _channel is not None:
        _channel.send(kind, payload)


def note(line: str) -> None:
    """A note for the driver's console."""
    send("note", line)
