"""Tiny curriculum specs, Ray Train helpers and a W&B offline-run reader for the training tests
(the prepared demo corpus is a fixture of tests/conftest.py)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import psutil

from pipeline.assets import tiny_model_section
from pipeline.spec import JobSpec
from pipeline.spec.loader import validate_spec
from tests.helpers import REPO

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

README_MAIN_JOB = re.compile(r"^bash \.ci/install && (qformer demo-corpus .*)$", re.MULTILINE)


def readme_main_job() -> list[str]:
    """The ``qformer`` commands of the README's main job, in order: the newcomer test
    (tests/train/test_newcomer_demo.py) runs them on a fresh copy of the repository."""
    return README_MAIN_JOB.search((REPO / "README.md").read_text()).group(1).split(" && ")


DEMO_FOLLOW_UP_COMMANDS = (
    "qformer status runs/demo",
    "qformer eval runs/demo/stage1 --data data/demo/prepared/00006.parquet --max-samples 128",
    "qformer export runs/demo/stage2 out/demo-stage2",
)
"""What the README and docs tell a newcomer to run after the main job; the newcomer test
(tests/train/test_newcomer_demo.py) runs them, in this order, on the main job's run."""


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


def in_bf16(raw: dict) -> dict:
    """``raw`` trained as users train: bf16 working precision, a float16 vision tower and a bf16
    LLM (tiny:llama ties its output embedding to its input one)."""
    raw["deepspeed"]["precision"] = "bf16"
    raw["model"]["vision"]["dtype"], raw["model"]["llm"]["dtype"] = "float16", "bfloat16"
    return raw


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


def engine_job(root: Path, *, zero_stage: int = 2, precision: str = "fp32", vision_dtype: str = "float32",
               llm_dtype: str = "float32") -> JobSpec:
    """The tiny two-stage job with the given engine settings (its data is never read)."""
    raw = tiny_job("engine", str(root / "runs"), str(root / "unused"), zero_stage=zero_stage)
    raw["deepspeed"]["precision"] = precision
    raw["model"]["vision"]["dtype"] = vision_dtype
    raw["model"]["llm"]["dtype"] = llm_dtype
    return job_spec(raw)


def random_batch(model, seed: int, batch_size: int = 4) -> dict:
    """Random images (normalised) and caption tokens of ``model``'s objective."""
    import torch

    from pipeline.model import build_llm_tokenizer, build_qformer_tokenizer

    generator = torch.Generator().manual_seed(seed)
    size = model.spec.vision.image_size
    pixels = torch.randn(batch_size, 3, size, size, generator=generator)
    words = ("red", "green", "blue", "circle", "square", "triangle")
    captions = [f"a {words[(seed + i) % 3]} {words[3 + (seed + 2 * i) % 3]}" for i in range(batch_size)]
    if model.objective == 1:
        tokens = build_qformer_tokenizer(model.spec.qformer)(
            captions, padding="max_length", truncation=True, max_length=model.spec.qformer.max_text_length,
            return_tensors="pt")
        return {"pixel_values": pixels, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    tokenizer = build_llm_tokenizer(model.spec.llm)
    tokens = tokenizer([c + tokenizer.eos_token for c in captions], padding="max_length", max_length=8,
                       return_tensors="pt")
    return {"pixel_values": pixels, "llm_input_ids": tokens["input_ids"], "llm_attention_mask": tokens["attention_mask"]}


def build_test_engine(job_json: str, *, stage_index: int, resume_from: str | None = None):
    """The engine a Ray Train worker builds for the stage (in a process where torch.distributed
    is initialised), resuming from a folder holding a saved training state when given."""
    import torch

    from pipeline.train.engine import build_engine
    from pipeline.train.step import StepPlan
    from pipeline.train.streams import StreamPlan

    job = JobSpec.model_validate_json(job_json)
    stage = job.stages[stage_index]
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    plan = StepPlan(StreamPlan.of(world, rank, world), 1, stage.batch_size, job.run.seed, stage_index,
                    (), "attention_mask", torch.device("cpu"), None)
    saved = placeholder = None
    if resume_from is not None:
        saved = {"step": 2, "samples_seen": 2 * stage.batch_size * world}
        from pipeline.model import Blip2Pretrainer

        probe = Blip2Pretrainer(job.model, objective=stage.objective)
        placeholder = {k: torch.zeros_like(v) if k == "pixel_values" else v
                       for k, v in random_batch(probe, 0, stage.batch_size).items()}
    return build_engine(job, stage, plan, folder=resume_from, saved=saved, init_weights=None,
                        placeholder=placeholder, rank=rank)


def run_ranks(function, world: int, *args):
    """Run ``function(rank, *args, out)`` in ``world`` gloo processes; returns what rank 0 saved
    with ``torch.save`` to the last argument (a path), or None when it saved nothing."""
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ranked, args=(world, port, function, args), nprocs=world, join=True)
    out = Path(str(args[-1]))
    return torch.load(out, weights_only=False) if out.is_file() else None


def _ranked(rank: int, world: int, port: int, function, args) -> None:
    import os
    import sys

    import torch
    import torch.distributed as dist

    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        function(rank, *args)
        dist.barrier()  # no rank tears down while another still talks
    finally:
        dist.destroy_process_group()
    # Done: leave without the interpreter's teardown, where a DeepSpeed engine's native threads
    # sometimes abort the process ("terminate called without an active exception") after the
    # work succeeded, which mp.spawn reports as a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
