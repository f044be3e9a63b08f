"""Per-step training metrics: a JSON-lines log in the run's storage, and loss-curve plots."""

from __future__ import annotations

import io
import json
import sys

from pipeline.io.storage import Location, atomic_write, exists, read_bytes

LOSS_PREFIX = "loss"
# Held-out metrics of periodic evaluation (pipeline.eval.periodic), all fractions in [0, 1].
EVAL_SERIES = ("eval_caption_accuracy", "eval_t2i_r1", "eval_i2t_itm_r1", "eval_itm_accuracy",
               "eval_exact_match", "eval_token_f1")


def console(line: str) -> None:
    """Show a progress line from a Ray Train worker on the driver's console, once.

    Ray Train replaces ``print`` in its workers by one that logs the line and also prints it
    when Ray has wrapped stdout, so every printed line reached the console twice.
    """
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class MetricsLog:
    """Records of one stage, kept in ``metrics.jsonl`` beside its plot.

    Local files get each record appended as it comes; object stores (no append) get the whole
    file rewritten at each ``flush`` (every checkpoint and at the end of the stage).
    """

    def __init__(self, location: Location, resume_step: int = 0):
        self.location = location
        self.records: list[dict] = []
        if exists(location):
            lines = read_bytes(location).decode().splitlines()
            # Steps after the checkpoint we resume from are trained again: drop their records.
            self.records = [r for r in map(json.loads, lines) if r["step"] <= resume_step]
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

    names = sorted({k for r in records for k in r if k.startswith(LOSS_PREFIX)})
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
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    with atomic_write(target) as handle:
        handle.write(buffer.getvalue())


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
