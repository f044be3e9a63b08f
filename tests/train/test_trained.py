"""Finding a checkpoint from a checkpoint, stage or run folder (``pipeline.train.trained``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.io.storage import Location
from pipeline.checkpoint.lookup import CheckpointNotFound, find_checkpoint
from tests.train.helpers import tiny_job


def _checkpoint(run: Path, stage_index: int, step: int) -> Path:
    """A stage's final checkpoint folder as training leaves it (weights content is not read)."""
    job = tiny_job("run", str(run.parent), "/prepared", stage1_steps=step, stage2_steps=step)
    stage = job["stages"][stage_index]["name"]
    folder = run / stage / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "trainable.safetensors").write_bytes(b"")
    (folder / "metadata.json").write_text(json.dumps(
        {"stage": stage, "stage_index": stage_index, "step": step, "spec": job}))
    (run / stage / "complete.json").write_text(json.dumps({"checkpoint": str(folder)}))
    return folder


@pytest.fixture
def run(tmp_path) -> Path:
    run = tmp_path / "run"
    stages = [{"stage": name, "checkpoint": str(_checkpoint(run, index, 6))}
              for index, name in enumerate(("stage1", "stage2"))]
    (run / "summary.json").write_text(json.dumps({"stages": stages}))
    return run


def test_a_checkpoint_folder_a_stage_folder_and_a_run_folder(run):
    final = run / "stage2" / "step-00000006"
    assert find_checkpoint(Location.of(str(final))).location.url == str(final)
    assert find_checkpoint(Location.of(str(run / "stage1"))).stage.name == "stage1"
    last = find_checkpoint(Location.of(str(run)))
    assert (last.stage.name, last.objective, last.step) == ("stage2", 2, 6)
    assert find_checkpoint(Location.of(str(run)), stage="stage1").objective == 1


@pytest.mark.parametrize("where, stage, message", [
    ("missing", None, "no such folder"),
    ("run", "stage3", "stage 'stage3' has not finished"),
    ("run/stage1", "stage2", "is a checkpoint of stage 'stage1', not 'stage2'"),
    ("run/stage1/step-00000006", "stage2", "is a checkpoint of stage 'stage1'"),
])
def test_what_is_not_there_is_named(run, where, stage, message):
    with pytest.raises(CheckpointNotFound, match=message):
        find_checkpoint(Location.of(str(run.parent / where)), stage=stage)


def test_a_run_folder_without_summary_lists_its_finished_stages(run):
    (run / "summary.json").unlink()
    with pytest.raises(CheckpointNotFound, match=r"--stage \(stage1, stage2\)"):
        find_checkpoint(Location.of(str(run)))


def test_metadata_that_is_not_a_checkpoints_is_refused(run):
    (run / "stage1" / "step-00000006" / "metadata.json").write_text('{"step": 1}')
    with pytest.raises(CheckpointNotFound, match="not the metadata of a training checkpoint"):
        find_checkpoint(Location.of(str(run / "stage1")))
