"""Per-step training metrics: a JSON-lines log in the run's storage, and loss-curve plots."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from pipeline.io.pictures import write_png
from pipeline.io.storage import Location, atomic_write, exists, read_bytes
from pipeline.spec.losses import LOSSES, TOTAL_LOSS
from pipeline.train.progress import note

LOSS_FIELDS = (TOTAL_LOSS, *(loss.output_field for loss in LOSSES))
# Held-out metrics of periodic evaluation (pipeline.eval.periodic), all fractions in [0, 1].
EVAL_SERIES = ("eval_caption_accuracy", "eval_t2i_r1", "eval_i2t_itm_r1", "eval_itm_accuracy",
               "eval_exact_match", "eval_token_f1", "eval_query_cosine")


def console(line: str) -> None:
    """A note from a Ray Train worker (resumed, initialised from ...): into the command's log
    (the worker's output, which Ray forwards to the driver) and, from rank 0, onto the driver's
    console (:mod:`pipeline.train.progress`).

    Written to ``sys.stdout`` directly: Ray Train replaces ``print`` in its workers by one that
    logs the line and also prints it when Ray has wrapped stdout, so a printed line came twice.
    """
    log_line(line)
    note(line)


def log_line(line: str) -> None:
    """A line into the command's log only (the worker's output)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class StepTiming:
    """How one optimizer step went: the learning rate it used, its wall time and the part of
    it spent waiting for data."""

    lr: float
    step_time_s: float
    data_wait_s: float


class StepClock:
    """Times a stage's steps (``start`` before, ``stop`` after) and estimates the time left."""

    def __init__(self, start_step: int, total_steps: int):
        self.start_step, self.total_steps = start_step, total_steps
        self.started = time.monotonic()
        self._step_started, self._lr, self._wait = 0.0, 0.0, 0.0

    def start(self, *, lr: float, wait: float) -> None:
        """A step begins; ``wait`` is the data wait of the stage so far (seconds)."""
        self._step_started, self._lr, self._wait = time.monotonic(), lr, wait

    def stop(self, *, wait: float) -> StepTiming:
        """The step ends; ``wait`` as in :meth:`start`."""
        return StepTiming(self._lr, time.monotonic() - self._step_started, wait - self._wait)

    def progress_line(self, stage: str, record: dict) -> str:
        """The log line of a step record: losses, lr, throughput, data wait and ETA."""
        done = record["step"]
        elapsed = time.monotonic() - self.started
        eta = elapsed / max(1, done - self.start_step) * (self.total_steps - done)
        return f"[{stage}] step {done}/{self.total_steps} | {record_detail(record)} | ETA {eta:.0f}s"


def record_detail(record: dict) -> str:
    """A step record in a few words: losses, lr, throughput and data wait."""
    losses = " ".join(f"{k[5:] or 'total'} {v:.4f}" for k, v in record.items() if k in LOSS_FIELDS)
    wait = 100 * record["data_wait_s"] / max(record["step_time_s"], 1e-9)
    return f"{losses} | lr {record['lr']:.2e} | {record['samples_per_s']:.1f} samples/s | data wait {wait:.0f}%"


_GROUPS = {"lr": "optim", "samples_per_s": "throughput", "tokens_per_s": "throughput",
           "data_wait_s": "time", "step_time_s": "time", "samples_seen": "progress"}


def scalars(record: dict) -> dict[str, float]:
    """A record's numbers under the names trackers show them by (``loss/itc``, ``eval/t2i_r1``,
    ``throughput/samples_per_s``, ...); the step is not among them."""
    named = {}
    for key, value in record.items():
        if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key == TOTAL_LOSS:
            name = "loss/total"
        elif key in LOSS_FIELDS:
            name = "loss/" + key[len(TOTAL_LOSS) + 1:]
        elif key.startswith("eval_"):
            name = "eval/" + key[len("eval_"):]
        else:
            name = f"{_GROUPS.get(key, 'train')}/{key}"
        named[name] = float(value)
    return named


def step_record(step: int, fields: tuple[str, ...], means: list[float], timing: StepTiming, *,
                samples_per_step: int, micro_batches: int) -> dict:
    """The ``metrics.jsonl`` record of a step.

    Args:
        step: Steps done.
        fields: The loss fields, in the order of ``means``.
        means: Each field's mean over the step's micro-batches, then the mean tokens per micro-batch.
        timing: The step's timing.
        samples_per_step: Samples of one step, all workers together.
        micro_batches: Micro-batches of one step, all workers together.
    """
    return {
        "step": step,
        **{name: round(value, 6) for name, value in zip(fields, means[:-1])},
        "lr": timing.lr,
        "samples_per_s": round(samples_per_step / timing.step_time_s, 3),
        "tokens_per_s": round(means[-1] * micro_batches / timing.step_time_s, 1),
        "data_wait_s": round(timing.data_wait_s, 4),
        "step_time_s": round(timing.step_time_s, 4),
        "samples_seen": step * samples_per_step,
    }


def read_records(location: Location) -> list[dict]:
    """The records of a ``metrics.jsonl``. A torn last line (a writer killed mid-line, a full
    disk) is dropped, and the console says so; any other unreadable line is an error.

    Raises:
        ValueError: a line other than the last is not JSON.
    """
    lines = read_bytes(location).decode(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise ValueError(f"{location.url}: line {number} is not a JSON record") from None
            console(f"{location.url}: dropped a torn last line ({len(line)} characters)")
    return records


class MetricsLog:
    """Records of one stage, kept in ``metrics.jsonl`` beside its plot.

    Local files get each record appended as it comes; object stores (no append) get the whole
    file rewritten at each ``flush`` (every checkpoint and at the end of the stage).
    """

    def __init__(self, location: Location, resume_step: int = 0):
        self.location = location
        self.records: list[dict] = []
        if exists(location):
            # Steps after the checkpoint we resume from are trained again: drop their records.
            self.records = [r for r in read_records(location) if r["step"] <= resume_step]
        self.flush()

    def append(self, record: dict) -> None:
        self.records.append(record)
        if self.location.is_local:
            fs, path = self.location.filesystem()
            with fs.open(path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        with atomic_write(self.location) as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in self.records).encode())


def plot_losses(records: list[dict], target: Location, title: str) -> None:
    """Write a PNG of every ``loss*`` series against the step, and beside it the held-out
    evaluation metrics when the records hold any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k for r in records for k in r if k in LOSS_FIELDS})
    evals = [name for name in EVAL_SERIES if any(name in r for r in records)]
    if evals:
        figure, (axis, eval_axis) = plt.subplots(1, 2, figsize=(14, 4.5), dpi=100)
        _plot_eval(eval_axis, records, evals)
    else:
        figure, axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name in names:
        points = [(r["step"], r[name]) for r in records if name in r]
        axis.plot([p[0] for p in points], [p[1] for p in points], label=name,
                  linewidth=2.2 if name == "loss" else 1.2)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    if names:
        axis.legend()
    figure.tight_layout()
    write_png(figure, target)


def _plot_eval(axis, records: list[dict], names: list[str]) -> None:
    for name in names:
        points = [(r["step"], r[name]) for r in records if name in r]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                  label=name[len("eval_"):])
    axis.set_xlabel("step")
    axis.set_ylabel("held-out metric")
    axis.set_ylim(0, 1.02)
    axis.set_title("held-out evaluation")
    axis.grid(alpha=0.3)
    axis.legend()
