"""The files of a run folder and of its checkpoints.

A run folder (``{run.storage}/{run.name}/``) holds ``job.json``, one folder per stage, the
commands' ``logs/``, and ``summary.json`` once every stage has finished. A stage folder holds
its checkpoints (``step-NNNNNNNN/``), ``metrics.jsonl`` and TensorBoard event files,
``attempts.jsonl``, ``loss.png`` and, once the stage has finished, ``complete.json`` naming its
final checkpoint. A checkpoint folder holds the files below.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from pipeline.errors import UsageError
from pipeline.io.storage import Location, read_bytes

TRAINABLE = "trainable.safetensors"
"""The trainable weights, consolidated, in fp32 (the optimizer's masters under ZeRO)."""
OPTIMIZER = "optimizer.safetensors"
"""The AdamW state, consolidated (see ``pipeline.train.state``)."""
METADATA = "metadata.json"
"""Stage, step, samples seen, data position, world size, the job spec, library versions."""
METRICS = "metrics.jsonl"
"""The stage's metrics records up to the checkpoint's step."""
COMPLETE = "complete.json"
"""In a stage folder: the stage has finished; names its final checkpoint."""
SUMMARY = "summary.json"
"""In a run folder: every stage has finished; lists them with their final checkpoints."""
JOB = "job.json"
"""In a run folder: the job spec of its latest ``qformer train`` (paths resolved), with the
commands that ran it (``launches``: id, time, host)."""
TRACKING = "tracking.json"
"""In a run folder: the ids of its MLflow and W&B runs, which a resumed run continues."""
ATTEMPTS = "attempts.jsonl"
"""In a stage folder: one line each time its workers started it (time, step, workers, the
command's launch id); more than one per launch: Ray Train restarted failed workers."""
REGISTERED = "checkpoint_manager_snapshot.json"
"""In a stage folder: Ray Train's record of the checkpoints it has registered (written by Ray)."""
LOSS_PLOT = "loss.png"
"""In a stage folder: the loss curves (and held-out metrics), drawn at the end of the stage."""


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint written after ``step`` steps."""
    return f"step-{step:08d}"


class CheckpointError(UsageError, ValueError):
    """A checkpoint cannot be used as asked (missing, unreadable, or not of this model)."""


def read_trainable(folder: Location) -> tuple[dict[str, torch.Tensor], bytes]:
    """The consolidated trainable weights of a checkpoint folder (local or ``s3://``) by
    parameter name, and the file's bytes.

    Raises:
        CheckpointError: the file is missing or not a readable safetensors file.
    """
    file = folder.child(TRAINABLE)
    try:
        data = read_bytes(file)
        return load_safetensors(data), data
    except FileNotFoundError:
        raise CheckpointError(f"{file.url}: no such file") from None
    except (SafetensorError, ValueError) as err:
        raise CheckpointError(f"{file.url}: unreadable ({err})") from None


def load_trainable_weights(folder: Location) -> dict[str, torch.Tensor]:
    """The consolidated trainable weights of a checkpoint folder (see :func:`read_trainable`)."""
    return read_trainable(folder)[0]
