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
    """A progress board (a Ray actor handle) for rank 0, polled into ``view`` while the block runs.
    The display never stops training: if it fails, it says so once and stops."""
    import ray

    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    stop, failed = threading.Event(), threading.Event()

    def drain() -> None:
        if failed.is_set():
            return
        try:
            view(ray.get(board.take.remote(), timeout=30))
        except Exception as err:
            failed.set()
            log.warning("train: the progress display stopped (%s); training goes on", err)

    def poll() -> None:
        while not stop.wait(POLL_S) and not failed.is_set():
            drain()

    thread = threading.Thread(target=poll, name="qformer-progress", daemon=True)
    thread.start()
    try:
        yield board
    finally:
        stop.set()
        thread.join()
        drain()  # what rank 0 sent last
        ray.kill(board)
        view.close()
