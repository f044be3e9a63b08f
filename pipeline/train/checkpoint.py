"""Checkpoints of a stage: the trainable state in one portable format, plus what resume needs.

A checkpoint folder holds::

    trainable.safetensors   the fp32 master weights of the trainable parameters (no frozen tensor)
    optimizer.safetensors   the AdamW state and scheduler (see pipeline/train/state.py)
    metadata.json           stage, step, samples seen, data position, world size, dtypes, spec,
                            library versions
    metrics.jsonl           the stage's metrics up to this step

It loads at any world size and ZeRO stage. Rank 0 gathers the state, writes the folder and hands
it to Ray Train, which uploads it in the background while training goes on and registers it only
once it is all in storage, so a checkpoint being written when the run died is never the one
resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from pipeline.checkpoint.format import METADATA, METRICS
from pipeline.train.state import TrainingState, gather_state, restore_state
from pipeline.versions import library_versions

_TMP_PREFIX = "qformer-ckpt-"


def save_and_report(engine, *, rank: int, metadata: dict, metrics: dict, metrics_records: list[dict],
                    name: str) -> None:
    """Gather the state on rank 0, write the checkpoint there, and report it to Ray Train (every
    rank reports: a barrier). The upload runs in the background; the local folder is removed
    once it is uploaded."""
    import ray.train

    state = gather_state(engine)
    checkpoint = None
    if rank == 0:
        folder = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-"))
        state.save(folder)
        record = {**metadata, "saved_at": time.time(), "versions": library_versions("deepspeed", "ray")}
        (folder / METADATA).write_text(json.dumps(record, indent=1))
        (folder / METRICS).write_text("".join(json.dumps(r) + "\n" for r in metrics_records))
        checkpoint = ray.train.Checkpoint.from_directory(str(folder))
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)


def remove_stale_folders() -> list[str]:
    """Delete the local checkpoint folders that processes no longer alive left in the temporary
    folder (a worker killed before its upload finished); returns what was deleted."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{_TMP_PREFIX}*"):
        pid = folder.name.removeprefix(_TMP_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    return removed


def read_metadata(folder: str | Path) -> dict:
    """A local checkpoint folder's ``metadata.json``."""
    return json.loads((Path(folder) / METADATA).read_text())


def restore(engine, folder: str | Path, metadata: dict, *, warmup_step: Callable[[float], None]) -> None:
    """Load a checkpoint folder into ``engine`` (built from a model that already holds the
    checkpoint's weights).

    Args:
        engine: The freshly initialised engine.
        folder: The local checkpoint folder.
        metadata: Its ``metadata.json``.
        warmup_step: See :func:`pipeline.train.state.restore_state`.
    """
    restore_state(engine, TrainingState.load(Path(folder)), step=metadata["step"],
                  samples=metadata["samples_seen"], warmup_step=warmup_step)
