"""Tiny curriculum specs, Ray Train helpers and a W&B offline-run reader for the training tests
(the prepared demo corpus is a fixture of tests/conftest.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil

from pipeline.assets import tiny_model_section
from pipeline.spec import JobSpec
from pipeline.spec.loader import validate_spec

NEWCOMER_COMMANDS = (
    "qformer demo-corpus data/demo/raw",
    "qformer prep jobs/prep_demo.yaml",
    "qformer train jobs/demo_tiny.yaml --set run.tracking.mlflow.experiment=demo "
    "--set run.tracking.wandb.project=demo",
    "qformer status runs/demo-tiny",
    "qformer status runs/demo-tiny --json",
)
"""Commands of the docs that tests/train/test_user_view.py runs, in this order, in a folder
holding a copy of jobs/."""


def tiny_job(name: str, storage: str, prepared: str, *, zero_stage: int = 2,
             stage1_steps: int = 6, stage2_steps: int | None = 4, checkpoint_every: int = 3,
             **storage_options) -> dict:
    """A tiny two-stage (or one-stage) curriculum as a spec mapping."""
    stages = [{
        "name": "stage1", "losses": {"itc": 1.0, "itm": 1.0, "itg": 1.0},
        "steps": stage1_steps, "batch_size": 4, "checkpoint_every": checkpoint_every,
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2},
    }]
    if stage2_steps:
        stages.append({
            "name": "stage2", "losses": {"lm": 1.0}, "steps": stage2_steps, "batch_size": 4,
            "checkpoint_every": checkpoint_every, "init_from": "stage1",
            "optimizer": {"lr": 1e-3, "min_lr": 1e-4},
        })
    job = {
        "run": {"name": name, "storage": storage, "seed": 7, "keep_checkpoints": 2},
        "scaling": {"workers": 2, "cpus_per_worker": 1, "max_failures": 2},
        "model": tiny_model_section(num_query_tokens=4, embed_dim=16),
        "data": {"prepared": prepared, "decode_threads": 1, "prefetch_batches": 2},
        "deepspeed": {"zero_stage": zero_stage, "precision": "fp32"},
        "stages": stages,
    }
    if storage_options:
        job["run"]["storage_options"] = storage_options
    return job


def job_spec(raw: dict) -> JobSpec:
    return validate_spec(raw, JobSpec)


def registered_checkpoint(fs, stage: str) -> str | None:
    """The newest checkpoint Ray Train has registered for a stage folder (``fs`` path), if any.

    A checkpoint's ``metadata.json`` (rank 0's part) can be in storage before every rank's part
    is; Ray Train resumes only from checkpoints in its ``checkpoint_manager_snapshot.json``.
    """
    fs.invalidate_cache()
    try:
        snapshot = json.loads(fs.cat_file(f"{stage}/checkpoint_manager_snapshot.json"))
    except FileNotFoundError:
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return latest["checkpoint_dir_name"] if latest else None


def wait_for_registered_checkpoint(fs, stage: str, running, timeout_s: float = 240) -> str:
    """Wait until Ray Train has registered a checkpoint of the stage while ``running()`` holds."""
    deadline = time.monotonic() + timeout_s
    while (name := registered_checkpoint(fs, stage)) is None:
        assert running(), "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint registered in time"
        time.sleep(0.2)
    return name


def train_worker_pids() -> list[int]:
    """Process ids of the Ray Train workers this test process started (its Ray's, through the
    raylet it started; another process's Ray on the same machine is left alone)."""
    workers = []
    for process in psutil.Process().children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in process.cmdline()):
                workers.append(process.pid)
        except psutil.NoSuchProcess:
            continue
    return workers


def wandb_history(run_file) -> list[dict]:
    """The ``history`` rows (what ``run.log`` logged) of a W&B offline run's ``run-*.wandb`` file.

    The file is W&B's transaction log: a 7-byte header, then LevelDB-log records (32 KiB blocks,
    each chunk with a 7-byte header: CRC, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) holding
    ``wandb_internal_pb2.Record`` messages.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    block, position, pending, rows = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer or padding
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows
