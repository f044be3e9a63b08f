"""Checkpoints of a stage: DeepSpeed state without frozen weights, plus what resume needs.

A checkpoint folder holds::

    ds/                     DeepSpeed engine state, one file set per rank (trainable parts only)
    trainable.safetensors   the trainable weights, consolidated (any world size can load them)
    metadata.json           stage, step, samples seen, data position, spec, library versions
    metrics.jsonl           the stage's metrics up to this step

Every rank writes its part into a local folder and reports it to Ray Train, which merges the
parts into the run's storage and registers the checkpoint only once all of it is there, so a
checkpoint being written when the run died is never the one resumed from.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from pipeline.io.storage import Location, read_bytes

DS_TAG = "ds"
TRAINABLE = "trainable.safetensors"
METADATA = "metadata.json"
METRICS = "metrics.jsonl"


def library_versions() -> dict[str, str]:
    import deepspeed
    import ray
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
    }


def consolidated_trainable_state(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full trainable weights on every rank (ZeRO-3 partitions are gathered first)."""
    model = engine.module
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {name: p.detach().float().cpu().clone() for name, p in named}
    return {name: p.detach().float().cpu().clone() for name, p in named}


def save_and_report(engine, *, rank: int, zero_stage: int, metadata: dict, metrics: dict,
                    metrics_records: list[dict], name: str) -> None:
    """Write this rank's part of the checkpoint and report it to Ray Train (a barrier)."""
    import ray.train

    state = consolidated_trainable_state(engine, zero_stage)
    with tempfile.TemporaryDirectory(prefix="qformer-ckpt-") as folder:
        engine.save_checkpoint(folder, tag=DS_TAG, exclude_frozen_parameters=True, save_latest=False)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, str(Path(folder) / TRAINABLE))
            record = {**metadata, "saved_at": time.time(), "versions": library_versions()}
            (Path(folder) / METADATA).write_text(json.dumps(record, indent=1))
            (Path(folder) / METRICS).write_text("".join(json.dumps(r) + "\n" for r in metrics_records))
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=name,
        )


def restore(engine) -> tuple[dict, list[dict]] | None:
    """Load the latest checkpoint Ray Train hands this worker; returns (metadata, metrics)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        engine.load_checkpoint(
            folder, tag=DS_TAG, load_module_strict=False,
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )
        metadata = json.loads((Path(folder) / METADATA).read_text())
        metrics_path = Path(folder) / METRICS
        records = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    return metadata, records


def load_trainable_weights(folder: Location) -> dict[str, torch.Tensor]:
    """The consolidated trainable weights of a checkpoint folder (local or ``s3://``)."""
    return load_safetensors(read_bytes(folder.child(TRAINABLE)))
