"""Tiny checkpoints written the way training writes them (without running Ray Train)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.model import Blip2Pretrainer
from tests.train.helpers import job_spec, tiny_job


def write_checkpoint(folder: Path, raw_job: dict, stage_index: int, seed: int = 0) -> Path:
    """A checkpoint folder (trainable.safetensors + metadata.json) of a freshly initialised
    tiny model of the stage; returns the folder."""
    job = job_spec(raw_job)
    stage = job.stages[stage_index]
    torch.manual_seed(seed)
    model = Blip2Pretrainer(job.model, objective=stage.objective, loss_weights=stage.losses)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.trainable_state_dict().items()},
              str(folder / "trainable.safetensors"))
    metadata = {"stage": stage.name, "stage_index": stage_index, "step": 3, "world_size": 1,
                "spec": job.model_dump(mode="json")}
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoints(prepared_demo, tmp_path_factory) -> dict[int, Path]:
    """A stage-1 checkpoint inside a stage folder (with complete.json) and a stage-2 checkpoint."""
    root = tmp_path_factory.mktemp("eval-run")
    raw = tiny_job("tiny", str(root), prepared_demo)
    stage1 = write_checkpoint(root / "tiny" / "stage1" / "step-00000003", raw, 0)
    (root / "tiny" / "stage1" / "complete.json").write_text(json.dumps({"checkpoint": str(stage1)}))
    stage2 = write_checkpoint(root / "tiny" / "stage2" / "step-00000003", raw, 1)
    return {1: stage1, 2: stage2}
