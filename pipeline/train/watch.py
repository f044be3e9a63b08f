"""The driver's view of a running stage: what rank 0 sends (``pipeline.train.progress``) shown
on the console's progress display and passed on to MLflow and W&B."""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator

from pipeline.console import console
from pipeline.eval.periodic import progress_line
from pipeline.spec.train import StageSpec
from pipeline.train.metrics import record_detail
from pipeline.train.progress import ProgressBoard
from pipeline.train.tracking import Trackers

log = logging.getLogger("qformer.train")
POLL_S = 0.5


class StageView:
    """Shows one stage's records and notes, and hands the records to the trackers."""

    def __init__(self, stage: StageSpec, trackers: Trackers):
        self.stage, self.trackers = stage, trackers
        self.progress = console().progress(f"[{stage.name}] step", stage.steps)
        self.last: dict | None = None

    def __call__(self, items: list[tuple[str, object]]) -> None:
        for kind, payload in items:
            if kind == "note":
                self.progress.write(payload)
                continue
            if "eval_samples" in payload:
                self.progress.write(progress_line(self.stage, payload))
            else:
                self.last = payload
                self.progress.update(payload["step"], record_detail(payload))
            self.trackers.log(self.stage.name, payload)

    def close(self) -> None:
        self.progress.close()


@contextmanager
def watch_stage(view: StageView) -> Iterator[object]:
    """A progress board (a Ray actor handle) for rank 0, polled into ``view`` while the block runs."""
    import ray

    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(POLL_S):
            try:
                view(ray.get(board.take.remote(), timeout=30))
            except Exception as err:  # the display must never stop training
                log.debug("progress poll failed: %s", err)

    thread = threading.Thread(target=poll, name="qformer-progress", daemon=True)
    thread.start()
    try:
        yield board
    finally:
        stop.set()
        thread.join()
        try:
            view(ray.get(board.take.remote(), timeout=30))
        finally:
            ray.kill(board)
            view.close()
