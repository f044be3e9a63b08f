"""Checkpoints of a stage: DeepSpeed state without frozen weights, plus what resume needs.

A checkpoint folder holds::

    ds/                     DeepSpeed engine state, one file set per rank (trainable parts only)
    trainable.safetensors   the trainable weights, consolidated (fp32 masters under ZeRO)
    optimizer.safetensors   the AdamW state, consolidated (ZeRO 1-3; see portable_state.py)
    metadata.json           stage, step, samples seen, data position, world size, spec, versions
    metrics.jsonl           the stage's metrics up to this step

Resuming at the world size and ZeRO stage that wrote a checkpoint loads ``ds/`` (DeepSpeed's own
state, bit for bit); at another world size the consolidated files are loaded instead.

Every rank writes its part into a local folder and reports it to Ray Train, which merges the
parts into the run's storage and registers the checkpoint only once all of it is there, so a
checkpoint being written when the run died is never the one resumed from.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file

from pipeline.checkpoint.format import DS_TAG, METADATA, METRICS, OPTIMIZER, TRAINABLE
from pipeline.train.portable_state import full_optimizer_state, full_weights, load_portable_state
from pipeline.versions import library_versions


def save_and_report(engine, *, rank: int, zero_stage: int, metadata: dict, metrics: dict,
                    metrics_records: list[dict], name: str) -> None:
    """Write this rank's part of the checkpoint and report it to Ray Train (a barrier)."""
    import ray.train

    weights = full_weights(engine, zero_stage)
    optimizer = full_optimizer_state(engine, zero_stage)
    with tempfile.TemporaryDirectory(prefix="qformer-ckpt-") as folder:
        engine.save_checkpoint(folder, tag=DS_TAG, exclude_frozen_parameters=True, save_latest=False)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(Path(folder) / TRAINABLE))
            if optimizer is not None:
                (Path(folder) / OPTIMIZER).write_bytes(optimizer)
            record = {**metadata, "saved_at": time.time(), "versions": library_versions("deepspeed", "ray")}
            (Path(folder) / METADATA).write_text(json.dumps(record, indent=1))
            (Path(folder) / METRICS).write_text("".join(json.dumps(r) + "\n" for r in metrics_records))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=name,
        )


def read_metadata(folder: str | Path) -> dict:
    """A local checkpoint folder's ``metadata.json``."""
    return json.loads((Path(folder) / METADATA).read_text())


def needs_portable_load(metadata: dict, *, world_size: int, zero_stage: int) -> bool:
    """Whether ``ds/`` cannot be loaded as is: the world size or the ZeRO stage changed.

    Raises:
        ValueError: the checkpoint has no consolidated optimizer state to load instead.
    """
    if metadata["world_size"] == world_size and metadata["zero_stage"] == zero_stage:
        return False
    if metadata["zero_stage"] == 0 and zero_stage == 0:
        return False  # without ZeRO, DeepSpeed's optimizer state is not partitioned
    if metadata["zero_stage"] == 0:
        raise ValueError(
            f"the checkpoint was written with zero_stage 0 on {metadata['world_size']} workers; "
            f"resume it with zero_stage 0 (asked: zero_stage {zero_stage} on {world_size} workers)"
        )
    return True


def restore(engine, folder: str | Path, metadata: dict, *, portable: bool,
            warmup_step: Callable[[float], None]) -> list[dict]:
    """Load a checkpoint folder into ``engine``; returns the stage's metrics records so far.

    Args:
        engine: The freshly initialised engine (for ``portable``, of a model that already holds
            the checkpoint's ``trainable.safetensors``).
        folder: The local checkpoint folder.
        metadata: Its ``metadata.json``.
        portable: Load the consolidated state (another world size or ZeRO stage) instead of ``ds/``.
        warmup_step: See :func:`pipeline.train.portable_state.load_portable_state`.
    """
    folder = Path(folder)
    if portable:
        load_portable_state(
            engine, load_file(folder / TRAINABLE), (folder / OPTIMIZER).read_bytes(),
            step=metadata["step"], samples=metadata["samples_seen"], warmup_step=warmup_step,
        )
    else:
        engine.load_checkpoint(
            str(folder), tag=DS_TAG, load_module_strict=False,
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )
    metrics_path = folder / METRICS
    return [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
