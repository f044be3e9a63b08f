"""Rank 0's records of a stage, kept three ways: appended to ``metrics.jsonl`` (the record of
the run), written as TensorBoard scalars beside it, and sent to the driver's display."""

from __future__ import annotations

import json
import time

from pipeline.checkpoint.format import ATTEMPTS, METRICS
from pipeline.io.storage import Location, exists, read_bytes, write_bytes_atomic
from pipeline.io.tensorboard import EventLog
from pipeline.train.metrics import MetricsLog, scalars
from pipeline.train.progress import send


class StageRecords:
    """The records of one stage on rank 0.

    Args:
        stage_dir: The stage's folder in the run.
        resume_step: The step training resumes from (0: the start); later records of earlier
            attempts are dropped from ``metrics.jsonl`` and hidden in TensorBoard.
        tensorboard: Write TensorBoard event files.
        attempt: What to record of this start of the stage in ``attempts.jsonl`` (launch id,
            workers), besides the time and ``resume_step``.
    """

    def __init__(self, stage_dir: Location, resume_step: int = 0, *, tensorboard: bool = True,
                 attempt: dict | None = None):
        _record_attempt(stage_dir.child(ATTEMPTS), {"time": time.time(), "start_step": resume_step,
                                                    **(attempt or {})})
        self.log = MetricsLog(stage_dir.child(METRICS), resume_step)
        self.events = EventLog(stage_dir, purge_step=resume_step + 1) if tensorboard else None

    @property
    def records(self) -> list[dict]:
        return self.log.records

    def append(self, record: dict) -> None:
        self.log.append(record)
        if self.events is not None:
            self.events.scalars(record["step"], scalars(record))
        send("record", record)

    def flush(self) -> None:
        """Make everything logged so far durable (at checkpoints: object storage gets it now)."""
        self.log.flush()
        if self.events is not None:
            self.events.flush()

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


def _record_attempt(location: Location, attempt: dict) -> None:
    """Add a line to ``attempts.jsonl`` (rewritten whole: object stores cannot append)."""
    before = read_bytes(location).decode() if exists(location) else ""
    write_bytes_atomic(location, (before + json.dumps(attempt) + "\n").encode())
